# Quick start:  make demo   (set up + short CPU pretraining on built-in samples + export)
#               make test   (set up + the whole test suite on 8 fake CPU devices)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt  # the package, editable, + test extra
	touch $@

lint: setup
	$(PY) -m ruff check raddino_jax data_prep configs tests benchmarks

test: setup lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(PY) -m pytest -q --timeout=900 -n 2 --durations=15

demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
