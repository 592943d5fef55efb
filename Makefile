# Two set-up commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,demo]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/soup demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
