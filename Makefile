# Linux and macOS. Windows: see README.md for the same steps as pip commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this project's machines; a GPU user installs the CUDA build of the
# same release into $(VENV) first (README.md), and pip then keeps it.
TORCH_SPEC ?= torch==2.13.0
# open_clip ships the CLIP BPE vocabulary that single-file checkpoints need; we read only that
# file, so it goes in without its dependencies (its torchvision would replace our torch).
OPEN_CLIP_SPEC ?= open_clip_torch==3.3.0
# spandrel runs the model upscalers (engines/upscalers.py); it requires torchvision, whose PyPI build replaces our
# torch, and we import it without torchvision: it too goes in without its dependencies (einops is its one other).
SPANDREL_SPEC ?= spandrel==0.4.2
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install run test test-deps test-fast bench clean doctor

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(OPEN_CLIP_SPEC)" "$(SPANDREL_SPEC)" "einops>=0.7"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sdbridge serve $(ARGS)

doctor: $(STAMP)
	$(BIN)/sdbridge doctor $(ARGS)

# Test tools from Debian: chromium for the browser tests, liblo-tools for OSC interop.
# Skipped (and those tests skip with the reason) where apt-get is not available or not root.
test-deps:
	@if [ ! -x /usr/bin/chromium ] || ! command -v oscsend >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium liblo-tools >/dev/null) \
	      || echo "test-deps: apt-get failed; browser and liblo tests will skip"; \
	  else echo "test-deps: no apt-get as root; browser and liblo tests will skip"; fi; \
	fi

# Two workers, each taking whole files (module fixtures and a file's order kept): the suite waits on sockets,
# daemons and subprocesses about half the time, so two cores run it in about 10 minutes rather than 16.
TEST_WORKERS ?= 2

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not e2e and not slow" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_daemon.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
