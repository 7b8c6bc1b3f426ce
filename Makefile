# make demo   set up and run the seed walk-through
# make test   set up and run the test suite (and the linter)
# make bench  run the CPU benchmark (writes benchmarks/results/)

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed-dev: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) dev
	touch $@

setup: $(VENV)/.installed-dev

demo: setup
	$(PY) examples/quickstart.py

test: setup lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests benchmarks examples

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
