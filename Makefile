# clipq: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLIPQ := $(VENV)/bin/clipq
MODELS := cache/models
NETS := lenet5 lenet300_100

.PHONY: install data baseline finetune compress results compare own-data seen-data demo paper-sizes test test-slow test-caffe prototxt clean

install:                ## Debian packages, .venv, BVLC Caffe (cached build), clipq; then `clipq doctor`
	tools/install.sh

data: install           ## Fashion-MNIST -> Caffe LMDBs in the data cache
	$(PY) tools/make_fashion_mnist_lmdb.py

baseline: data          ## train LeNet-5 and LeNet-300-100 with `caffe train` (resumable)
	@for net in $(NETS); do \
	    $(CLIPQ) train --solver solvers/$${net}_solver.prototxt --output $(MODELS)/$${net}_fashion_mnist_55k.caffemodel || exit 1; \
	done

finetune: baseline       ## by hand: LeNet-5 with the example plan through `caffe train`, then `clipq export`
	$(CLIPQ) train --solver solvers/lenet5_clipq_solver.prototxt --weights $(MODELS)/lenet5_fashion_mnist_55k.caffemodel \
	    --output $(MODELS)/lenet5_clipq.caffemodel
	$(CLIPQ) export --model prototxt/lenet5/clipq_train_val.prototxt --weights $(MODELS)/lenet5_clipq.caffemodel \
	    --output $(MODELS)/lenet5_clipq_plain.caffemodel

# `clipq compress` settings of the demo: the smallest LeNet-5 whose decoded model loses at most
# MAX_DROP top-1 points on the held-out validation images (val_lmdb, the last 5,000 training images),
# in at most 5 fine-tuning rounds of the solver's 3,000 iterations; the search (50 evaluations per
# layer) measures its error on the same held-out images, lambda 1000 steering where it samples.
# FULL=1: LeNet-300-100 too.
LAMBDA ?= 1000
MAX_DROP ?= 0.5
VAL := cache/data/fashion_mnist/val_lmdb
COMPRESS_NETS := lenet5 $(if $(FULL),lenet300_100)
COMPRESS_FLAGS = --lam $(LAMBDA) --val $(VAL) --max-drop $(MAX_DROP)

compress: baseline      ## clipq compress --max-drop (search, fine-tuning rounds, export, encode, decode, evaluate, report)
	@for net in $(COMPRESS_NETS); do \
	    $(CLIPQ) compress --model prototxt/$$net/train_val.prototxt --weights $(MODELS)/$${net}_fashion_mnist_55k.caffemodel \
	        --solver solvers/$${net}_clipq_solver.prototxt --out cache/compress/$$net $(COMPRESS_FLAGS) \
	        || exit 1; \
	done

# The Fashion-MNIST results (README, docs/pipeline.md): both LeNets, --max-drop 0.5, for every seed in SEEDS (the search's
# seed and the fine-tuning solver's random_seed), then one table of mean (min .. max). A run that misses
# its budget (exit 1) is kept and counted in the table's "budget met" column.
SEEDS ?= 0 1 2
RESULT_NETS ?= lenet5 lenet300_100

results: baseline       ## the results table (README, docs/pipeline.md): both LeNets x SEEDS with --max-drop, then `clipq summary`
	@mkdir -p cache/results; for net in $(RESULT_NETS); do for seed in $(SEEDS); do \
	    echo "== $$net, seed $$seed: log in cache/results/$${net}_seed$$seed.txt"; \
	    $(CLIPQ) compress --model prototxt/$$net/train_val.prototxt --weights $(MODELS)/$${net}_fashion_mnist_55k.caffemodel \
	        --solver solvers/$${net}_clipq_solver.prototxt --out cache/results/$${net}_seed$$seed $(COMPRESS_FLAGS) \
	        --seed $$seed --no-progress > cache/results/$${net}_seed$$seed.txt 2>&1 \
	        || [ $$? -eq 1 ] || { tail -5 cache/results/$${net}_seed$$seed.txt; exit 1; }; \
	done; done
	$(CLIPQ) summary $(foreach net,$(RESULT_NETS),$(foreach seed,$(SEEDS),cache/results/$(net)_seed$(seed))) \
	    | tee cache/results/summary.md

# The paper's comparison (Table 4) on both LeNets: CLIP-Q at the search's plans nearest 30x/60x/120x, Deep
# Compression (also at its paper setting), DNS, LC pruning, prune-then-quantize and uniform CLIP-Q at the
# sizes of CLIP-Q's two smallest points; every method fine-tunes the solver's iterations in all (LeNet-5
# 3,000, LeNet-300-100 10,000). COMPARE_SEEDS="0 1 2": the search's and the fine-tuning's seed.
COMPARE_SEEDS ?= 0

compare: baseline       ## CLIP-Q vs Deep Compression, DNS, LC, sequential, uniform on both LeNets (clipq compare)
	@mkdir -p cache/compare; for net in $(NETS); do for seed in $(COMPARE_SEEDS); do \
	    echo "== $$net, seed $$seed: cache/compare/$${net}_seed$$seed (log: cache/compare/$${net}_seed$$seed.txt)"; \
	    $(CLIPQ) compare --model prototxt/$$net/train_val.prototxt --weights $(MODELS)/$${net}_fashion_mnist_55k.caffemodel \
	        --solver solvers/$${net}_clipq_solver.prototxt --out cache/compare/$${net}_seed$$seed --val $(VAL) \
	        --lam $(LAMBDA) --seed $$seed --no-progress > cache/compare/$${net}_seed$$seed.txt 2>&1 \
	        || { tail -5 cache/compare/$${net}_seed$$seed.txt; exit 1; }; \
	done; done
	$(CLIPQ) summary $(foreach net,$(NETS),$(foreach seed,$(COMPARE_SEEDS),cache/compare/$(net)_seed$(seed))) \
	    | tee cache/compare/summary.md

# The "Your own data" example (docs/own_data.md): a CSV of 5,000 labelled 28x28 images (Fashion-MNIST's first 5,000
# training images, standing in for yours) to a compressed, evaluated LeNet-5 with four clipq commands (data,
# init, train, compress --experiment), each skipped when its output is there; OWN_SEEDS="0 1 2" for a spread.
OWN := cache/own_data
OWN_SEEDS ?= 0

own-data: install       ## your own data, by example: CSV -> clipq data -> clipq init -> clipq train -> clipq compress
	@mkdir -p $(OWN); [ -f $(OWN)/digits.csv ] || $(PY) tools/fashion_mnist_csv.py $(OWN)/digits.csv
	[ -d $(OWN)/data ] || $(CLIPQ) data $(OWN)/digits.csv --out $(OWN)/data
	[ -d $(OWN)/exp ] || $(CLIPQ) init --deploy prototxt/lenet5/deploy.prototxt --data $(OWN)/data --out $(OWN)/exp
	$(CLIPQ) train --solver $(OWN)/exp/solver.prototxt --output $(OWN)/exp/baseline.caffemodel
	@for seed in $(OWN_SEEDS); do \
	    $(CLIPQ) compress --experiment $(OWN)/exp --out $(OWN)/exp/compress_seed$$seed --max-drop 1 --seed $$seed \
	        > $(OWN)/exp/compress_seed$$seed.txt 2>&1 || [ $$? -eq 1 ] || { tail -5 $(OWN)/exp/compress_seed$$seed.txt; exit 1; }; \
	done
	$(CLIPQ) summary $(foreach seed,$(OWN_SEEDS),$(OWN)/exp/compress_seed$(seed)) | tee $(OWN)/summary.md

# A baseline that has seen the user's images (docs/pipeline.md): Fashion-MNIST's first 5,000 training images as
# your data, a LeNet-5 trained on all of them (~100% top-1 on any split of them), compressed by `clipq compress
# --experiment` with --max-drop SEEN_DROP on a `clipq data` split of them, then judged on the 10,000 real test
# images it never saw (tools/seen_data.py report). SEEN_SEEDS="0 1 2" for a spread.
SEEN := cache/seen_data
SEEN_SEEDS ?= 0
SEEN_DROP ?= 0.3
TEST_LMDB := cache/data/fashion_mnist/test_lmdb

seen-data: data         ## a baseline that has seen your images: compressed on them, judged on unseen test images
	@mkdir -p $(SEEN); [ -f $(SEEN)/images.csv ] || $(PY) tools/fashion_mnist_csv.py $(SEEN)/images.csv
	[ -d $(SEEN)/all ] || $(CLIPQ) data $(SEEN)/images.csv --out $(SEEN)/all --val 0 --test 0 --no-progress
	$(PY) tools/seen_data.py baseline --data $(SEEN)/all --test $(TEST_LMDB) --out $(SEEN)/zoo
	[ -d $(SEEN)/data ] || $(CLIPQ) data $(SEEN)/images.csv --out $(SEEN)/data --no-progress
	[ -d $(SEEN)/exp ] || $(CLIPQ) init --deploy prototxt/lenet5/deploy.prototxt --data $(SEEN)/data --out $(SEEN)/exp
	@for seed in $(SEEN_SEEDS); do \
	    $(CLIPQ) compress --experiment $(SEEN)/exp --weights $(SEEN)/zoo/zoo.caffemodel --out $(SEEN)/compress_seed$$seed \
	        --max-drop $(SEEN_DROP) --seed $$seed --no-progress > $(SEEN)/compress_seed$$seed.txt 2>&1 \
	        || [ $$? -eq 1 ] || { tail -5 $(SEEN)/compress_seed$$seed.txt; exit 1; }; \
	done
	$(PY) tools/seen_data.py report --net $(SEEN)/zoo/train_val.prototxt --weights $(SEEN)/zoo/zoo.caffemodel \
	    $(foreach seed,$(SEEN_SEEDS),$(SEEN)/compress_seed$(seed)) | tee $(SEEN)/summary.md

demo: compress          ## install, data, baselines, then the CLIP-Q pipeline with --max-drop on LeNet-5 (FULL=1: both LeNets)
	@echo; echo "Fashion-MNIST test top-1 of the baselines (10,000 images):"
	@for net in $(NETS); do \
	    $(call report,$$net,prototxt/$$net/train_val.prototxt,$(MODELS)/$${net}_fashion_mnist_55k.caffemodel) || exit 1; \
	done
	@echo "Compressed models, test top-1 of the ONNX file in onnxruntime next to the decoded caffemodel's in Caffe:"
	@for net in $(COMPRESS_NETS); do \
	    echo "  $$net: $$(grep -h -e '^- ONNX' -e '^- \*\*no ONNX' cache/compress/$$net/report.md | cut -c3- | tr -d '*`')"; \
	done
	@for net in $(COMPRESS_NETS); do echo "CLIP-Q report: $$(readlink -f cache/compress/$$net/report.md)"; done

# report NAME,TRAIN_VAL,WEIGHTS: one line with the test accuracy and where the model is
report = acc=$$($(CLIPQ) evaluate --model $(2) --weights $(3) --json \
	| $(PY) -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["accuracy"])') \
	&& echo "  $(1): $$acc  model: $$(readlink -f $(3))"

paper-sizes: install    ## the storage columns of the paper's Tables 1-3, recomputed (random weights, paper's (p, b))
	@for net in alexnet googlenet resnet50; do \
	    echo; echo "== $$net: clipq size --model prototxt/$$net/deploy.prototxt --plan prototxt/$$net/paper_params.yaml --paper"; \
	    $(CLIPQ) size --model prototxt/$$net/deploy.prototxt --plan prototxt/$$net/paper_params.yaml --paper || exit 1; \
	done

reproduce-%: install    ## the paper's experiment for alexnet|googlenet|resnet50: IMAGENET=dir WEIGHTS=zoo.caffemodel, or SMOKE=1
	$(CLIPQ) reproduce $* $(if $(SMOKE),--smoke) $(if $(IMAGENET),--imagenet "$(IMAGENET)") $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(if $(PAPER_PLAN),--paper-plan)

test: install           ## the default test tier (real Caffe; minutes once Caffe is built)
	$(PY) -m pytest -q

test-slow: install      ## also the slow end-to-end tier
	$(PY) -m pytest -q -m ''

test-caffe: install     ## BVLC Caffe's own C++ tests (gtest, GPU tests filtered out), built in the cached Caffe tree
	tools/test_caffe.sh

prototxt: install       ## regenerate prototxt/ from python/clipq/caffe/nets.py
	$(PY) -m clipq.caffe.nets

clean:                  ## remove .venv and generated files (the caches under ~/.cache/clipq stay)
	rm -rf $(VENV) cache .pytest_cache python/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
