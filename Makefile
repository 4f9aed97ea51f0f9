# Thin wrapper around meson: `make run` and `make check` are the two first commands.
BUILD ?= build
MESON_OPTS ?=
ifdef CI
MESON_OPTS += -Dwerror=true
endif

.PHONY: all deps build run check bench docs clean

all: build

deps:
	@scripts/install-deps

$(BUILD)/build.ninja:
	@scripts/install-deps
	meson setup $(BUILD) $(MESON_OPTS)

build: deps $(BUILD)/build.ninja
	ninja -C $(BUILD)

run: build
	$(BUILD)/daemon/cbtd --state-dir var

check: build
	@scripts/run-tests $(BUILD)

bench: build
	@bench/run $(BUILD)

docs: build
	cp $(BUILD)/schemas/rpc.md docs/rpc.md

clean:
	rm -rf $(BUILD)
