# Thin wrapper around meson: `make run` and `make check` are the two first commands.
BUILD ?= build
# The libFuzzer harnesses need their own clang build (tests/fuzz/).
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 600
MESON_OPTS ?=
ifdef CI
MESON_OPTS += -Dwerror=true
endif

.PHONY: all deps build fuzz-build run check fuzz bench docs clean

all: build

deps:
	@scripts/install-deps

$(BUILD)/build.ninja:
	@scripts/install-deps
	meson setup $(BUILD) $(MESON_OPTS)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

$(FUZZ_BUILD)/build.ninja:
	@scripts/install-deps
	CC=clang meson setup $(FUZZ_BUILD) -Dfuzzing=true $(MESON_OPTS)

fuzz-build: deps $(FUZZ_BUILD)/build.ninja
	ninja -C $(FUZZ_BUILD) fuzzers

run: build
	$(BUILD)/daemon/cbtd --state-dir var

check: build fuzz-build
	@scripts/run-tests $(BUILD)
	@scripts/run-tests $(FUZZ_BUILD) --no-rebuild --suite fuzz

fuzz: fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) meson test -C $(FUZZ_BUILD) --no-rebuild --suite fuzz \
	  --timeout-multiplier 0 --print-errorlogs

bench: build
	@bench/run $(BUILD)

docs: build
	cp $(BUILD)/schemas/rpc.md docs/rpc.md

clean:
	rm -rf $(BUILD) $(FUZZ_BUILD)
