# clipq: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLIPQ := $(VENV)/bin/clipq
MODELS := cache/models
NETS := lenet5 lenet300_100

.PHONY: install data baseline demo test test-slow prototxt clean

install:                ## Debian packages, .venv, BVLC Caffe (cached build), clipq; then `clipq doctor`
	tools/install.sh

data: install           ## Fashion-MNIST -> Caffe LMDBs in the data cache
	$(PY) tools/make_fashion_mnist_lmdb.py

baseline: data          ## train LeNet-5 and LeNet-300-100 with `caffe train` (resumable)
	@for net in $(NETS); do \
	    $(CLIPQ) train --solver solvers/$${net}_solver.prototxt --output $(MODELS)/$${net}_fashion_mnist.caffemodel || exit 1; \
	done

demo: baseline          ## baseline + evaluation of each model on the Fashion-MNIST test set
	@for net in $(NETS); do \
	    acc=$$($(CLIPQ) evaluate --model prototxt/$$net/train_val.prototxt --weights $(MODELS)/$${net}_fashion_mnist.caffemodel --json \
	          | $(PY) -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["accuracy"])') || exit 1; \
	    echo "$$net: Fashion-MNIST test top-1 $$acc  model: $$(readlink -f $(MODELS)/$${net}_fashion_mnist.caffemodel)"; \
	done

test: install           ## the default test tier (real Caffe; minutes once Caffe is built)
	$(PY) -m pytest -q

test-slow: install      ## also the slow end-to-end tier
	$(PY) -m pytest -q -m ''

prototxt: install       ## regenerate prototxt/ from python/clipq/nets.py
	$(PY) -m clipq.nets

clean:                  ## remove .venv and generated files (the caches under ~/.cache/clipq stay)
	rm -rf $(VENV) cache .pytest_cache python/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
