# Mirrorline developer entry points.
#
#   make test    create .venv if needed, then run the whole test suite
#   make demo    a source and a target on this host replicating a sample directory
#   make lint    ruff + mypy --strict
#   make clean   remove the venv, caches and build output
#
# `deps` installs the FUSE system packages (pyfuse3 builds against libfuse3-dev; the
# source agent mounts with fusermount3) when they are missing and we are root; as
# another user it only says what to install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mirrorline-installed
APT_PACKAGES := fuse3 libfuse3-dev pkg-config

.PHONY: all deps venv test test-slow faults fuzz demo lint clean

all: test

deps:
	@missing=; \
	command -v fusermount3 >/dev/null 2>&1 || missing=1; \
	{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists fuse3; } || missing=1; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "deps: installing $(APT_PACKAGES)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq $(APT_PACKAGES) </dev/null; \
	else \
		echo "deps: warning: FUSE packages missing; as root run:" \
			"apt-get install $(APT_PACKAGES)" >&2; \
	fi

venv: $(STAMP)

# Re-installs when pyproject.toml changes; `deps` is order-only so it never forces that.
$(STAMP): pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[fuse,zstd,dev]'
	touch $@

test: venv
	$(BIN)/pytest -q -m "not slow and not faults_full" tests

# The whole fault suite (tests/faults), long scenarios included; totals printed at the end.
faults: venv
	MIRRORLINE_FAULT_STATS=$${MIRRORLINE_FAULT_STATS:-faults-stats.json} \
		$(BIN)/pytest -q tests/faults

# Long fuzzing run of the target side (tests/faults/test_fuzz.py): FUZZ_EXAMPLES examples
# of the sans-IO session machine and a fifth as many against a real agent over TCP
# (about ten minutes at the default); prints the cases run (fuzz_cases) at the end.
FUZZ_EXAMPLES ?= 3000
fuzz: venv
	MIRRORLINE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q --timeout=0 \
		tests/faults/test_fuzz.py

test-slow: venv
	$(BIN)/pytest -q -s -m slow tests

demo: venv
	bash deploy/demo.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy protocol source_agent target_agent cli tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build dist demo-run
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -maxdepth 1 -name '*.egg-info' -exec rm -rf {} +

# Benchmarks against rsync and lsyncd (bench/run.py; results in bench/RESULTS.md).
# Not part of `make test`; `python bench/run.py --smoke` is the quick check of the harness.
.PHONY: bench bench-quick
bench: venv
	$(BIN)/python bench/run.py

bench-quick: venv
	$(BIN)/python bench/run.py --quick
