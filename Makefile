# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

# trains, audits and corrects a network on built-in data; writes demo_output/ (report.html,
# results.json, figures/) and prints the report's path
demo: $(STAMP)
	$(PY) -m skdebias demo --output demo_output

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=900 tests --doctest-modules skdebias

test-all: $(STAMP)
	$(PY) -m pytest -q --timeout=1800 tests --doctest-modules skdebias

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
