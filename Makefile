# Two commands set up a fresh machine: `make train` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# dev brings the gcs extra and a GCS emulator (tests/test_gcs.py). libtpu (the tpu extra) lets
	# tests compile for TPU topologies ahead of time; optional.
	$(PY) -m pip install -q -e ".[dev,tpu]" || $(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: venv train test bench clean
venv: $(VENV)/.installed

# Train a byte-level LM on the embedded default corpus, then evaluate it.
# Expected result: docs/results.md#text
# FLAGS: extra --config.* overrides, e.g. FLAGS=--config.train.num_steps=1000 for a quick look.
WORKDIR ?= workdirs/text_small
train: venv
	$(PY) -m s5scale.train --config=configs/text_small.py --workdir=$(WORKDIR) $(FLAGS)
	$(PY) -m s5scale.evaluate --config=configs/text_small.py --workdir=$(WORKDIR) --all $(FLAGS)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

# S5 layer benchmark (docs/benchmarks.md).
bench: venv
	$(PY) tools/bench.py layer

clean:
	rm -rf $(VENV) workdirs

# The results-* targets, one per result in docs/results.md.
include results.mk
