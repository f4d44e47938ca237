# Development entry points. `make setup` builds the environment (scripts/setup.sh, idempotent);
# the other targets run it first, so they work on a fresh clone.
#
#   make test        the suite on ROS 2 Kilted, Python 3.11 (.venv, with torch)
#   make test-jazzy  the suite on ROS 2 Jazzy with Python 3.12 and 3.10 (no torch, as on a Jetson)
#   make test-all    both: the CI matrix (.ci/run)

VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test test-jazzy test-all demo clean

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q test

test-jazzy: setup
	bash scripts/test-matrix.sh jazzy-py312 jazzy-py310

test-all: test test-jazzy

demo: setup
	$(VENV)/bin/omnivision-demo

clean:
	rm -rf $(VENV) $(VENV)-* build install log .pytest_cache *.egg-info
