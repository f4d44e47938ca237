# Development entry points. `make setup` builds the environment (scripts/setup.sh, idempotent);
# the other targets run it first, so they work on a fresh clone.

VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test demo clean

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q test

demo: setup
	$(VENV)/bin/omnivision-demo

clean:
	rm -rf $(VENV) build install log .pytest_cache *.egg-info
