# clipq: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLIPQ := $(VENV)/bin/clipq
MODELS := cache/models
NETS := lenet5 lenet300_100

.PHONY: install data baseline finetune compress demo paper-sizes test test-slow prototxt clean

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

# `clipq compress` settings of the demo: lambda 1000 (error in percent vs the share of the net's bits
# saved; LeNet's ip1 holds 93% of them), 50 evaluations per layer, the solvers' 3,000 fine-tuning
# iterations. FULL=1: 10,000 fine-tuning iterations, and LeNet-300-100 too.
LAMBDA ?= 1000
COMPRESS_NETS := lenet5 $(if $(FULL),lenet300_100)
COMPRESS_FLAGS := --lam $(LAMBDA) $(if $(FULL),--max-iter 10000)

compress: baseline      ## clipq compress (search, fine-tune, export, encode, decode, evaluate, report) on the LeNets
	@for net in $(COMPRESS_NETS); do \
	    $(CLIPQ) compress --model prototxt/$$net/train_val.prototxt --weights $(MODELS)/$${net}_fashion_mnist_55k.caffemodel \
	        --solver solvers/$${net}_clipq_solver.prototxt --out cache/compress/$$net$(if $(FULL),_full) $(COMPRESS_FLAGS) \
	        || exit 1; \
	done

demo: compress          ## install, data, baselines, then the whole CLIP-Q pipeline on LeNet-5 (FULL=1: longer, both LeNets)
	@echo; echo "Fashion-MNIST test top-1 of the baselines (10,000 images):"
	@for net in $(NETS); do \
	    $(call report,$$net,prototxt/$$net/train_val.prototxt,$(MODELS)/$${net}_fashion_mnist_55k.caffemodel) || exit 1; \
	done
	@for net in $(COMPRESS_NETS); do echo "CLIP-Q report: $$(readlink -f cache/compress/$$net$(if $(FULL),_full)/report.md)"; done

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

prototxt: install       ## regenerate prototxt/ from python/clipq/nets.py
	$(PY) -m clipq.nets

clean:                  ## remove .venv and generated files (the caches under ~/.cache/clipq stay)
	rm -rf $(VENV) cache .pytest_cache python/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
