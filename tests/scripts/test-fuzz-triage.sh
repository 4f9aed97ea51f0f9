#!/bin/bash
# scripts/fuzz's triage of a run's findings, with fake harnesses: a leak report whose input does
# not leak again on replay starts the run over (and passes when that one does); a leak that
# reproduces fails; any other finding fails at once.
set -u
fuzz=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/seeds"
cat > "$dir/flaky" <<FAKE
#!/bin/bash
if [ "\$1" = $dir/flaky.crash-leak-1 ]; then exit 0; fi
if [ ! -e $dir/once ]; then touch $dir/once
  echo "==1==ERROR: LeakSanitizer: detected memory leaks"
  echo "artifact_prefix='x'; Test unit written to $dir/flaky.crash-leak-1"; exit 1; fi
exit 0
FAKE
cat > "$dir/leaks" <<FAKE
#!/bin/bash
echo "==1==ERROR: LeakSanitizer: detected memory leaks"
echo "artifact_prefix='x'; Test unit written to $dir/leaks.crash-leak-2"; exit 1
FAKE
cat > "$dir/crashes" <<FAKE
#!/bin/bash
echo "==1==ERROR: AddressSanitizer: heap-use-after-free"
echo "artifact_prefix='x'; Test unit written to $dir/crashes.crash-3"; exit 1
FAKE
chmod +x "$dir/flaky" "$dir/leaks" "$dir/crashes"
fail=0
expect() { # name, expected exit status
  "$fuzz" --runs 10 "$dir/$1" "$dir/seeds" > /dev/null 2>&1
  local rc=$?
  if [ "$rc" != "$2" ]; then echo "not ok: $1 exited $rc, expected $2"; fail=1; else echo "ok: $1 $rc"; fi
}
expect flaky 0
expect leaks 1
expect crashes 1
exit $fail
