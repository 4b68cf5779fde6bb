# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := experiments/data/prepared/manifest.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test venv data clean

venv: $(STAMP)

# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data: $(DATA)

$(DATA): experiments/data/prepare.py | $(STAMP)
	$(PY) experiments/data/prepare.py

run: $(STAMP) $(DATA)
	$(VENV)/bin/evolm run experiments/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf results .pytest_cache
