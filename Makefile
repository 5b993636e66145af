# `make demo` and `make test` do all set-up on a fresh machine: they create .venv on first use
# and install every distribution in this repo editable, with the development constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DISTS := . $(wildcard plugins/*) $(wildcard adapters/*)
STAMP := $(VENV)/.tmcore-installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard adapters/*/pyproject.toml) constraints-dev.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -r requirements-dev.txt $(foreach d,$(DISTS),-e $(d))
	touch $@

demo: $(STAMP)
	$(PY) -m tmcore.demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
