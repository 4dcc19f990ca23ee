# Two set-up commands (see README): `make demo` and `make test`.
# Each creates its own virtualenv; torch is pinned to the local CPU wheel here,
# pyproject keeps a range so GPU users bring their own build (an unpinned torch pulls a
# multi-GB CUDA build).
#
# Tests come in tiers (markers assigned in the TIERS table of tests/conftest.py):
#   make test-unit     fast unit tests
#   make test-e2e      end-to-end runs (training, fine-tuning, servers, the installed wheel)
#   make test-numpy2   the core (every tier but serving and the long learning runs) in a
#                      second virtualenv with numpy 2: only the serve extra (PyTriton 0.7)
#                      needs numpy<2
#   make test          all of them: every tier in one pytest run (one session, so the
#                      shared sample fixtures are built once), then test-numpy2
PYTHON ?= python3
VENV ?= .venv
# Inside $(VENV) so that .gitignore's `.venv/` covers it and `make clean` removes it.
VENV_NUMPY2 ?= $(VENV)/numpy2
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH := torch==2.13.0
PYTEST := -m pytest -q --durations=10

.PHONY: venv venv-numpy2 sample demo test test-all-tiers test-unit test-e2e test-numpy2 clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,offline-assets,serve]'
	touch $@

$(VENV_NUMPY2)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_NUMPY2)
	$(VENV_NUMPY2)/bin/pip install -q $(TORCH)
	$(VENV_NUMPY2)/bin/pip install -q -e '.[test,offline-assets]' 'numpy>=2'
	$(VENV_NUMPY2)/bin/python -c 'import numpy; assert int(numpy.__version__.split(".")[0]) >= 2'
	touch $@

venv: $(VENV)/.installed

venv-numpy2: $(VENV_NUMPY2)/.installed

# The real Wikipedia sample the tests use, into the cache both virtualenvs read.
sample: venv
	$(VENV)/bin/bertforge sample fetch

demo: venv
	$(VENV)/bin/bertforge demo

test: test-all-tiers test-numpy2

test-all-tiers: sample
	$(PY) $(PYTEST) tests

test-unit: sample
	$(PY) $(PYTEST) -m unit tests

test-e2e: sample
	$(PY) $(PYTEST) -m e2e tests

test-numpy2: sample venv-numpy2
	$(VENV_NUMPY2)/bin/python $(PYTEST) -m 'not serve and not learning' tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
