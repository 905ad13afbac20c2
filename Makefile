# Two entry points, each self-contained on a fresh machine: `make pretrain` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup pretrain test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

data/sample/manifest.json: $(STAMP)
	$(PY) jobs/make_sample_data.py --out data/sample

pretrain: $(STAMP) data/sample/manifest.json
	$(PY) jobs/pretrain.py

test: $(STAMP)
	$(PY) -m ruff check raytrainer jobs tests bench
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check raytrainer jobs tests bench

clean:
	rm -rf $(VENV) runs data/sample
