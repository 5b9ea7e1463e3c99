# Two commands set everything up on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Each (re)creates the local virtualenv with pip when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[bundled-models,test]'
	touch $@

demo: $(STAMP)
	$(PY) jobs/distill.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .leaf_cache runs .pytest_cache
