# make demo   set up and run the seed walk-through (a PNG and an interactive page)
# make test   set up and run the test suite (and the linter)
# make bench  run the CPU benchmark (writes benchmarks/results/)

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

EXTRAS ?= dev,demo,hf,train

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) $(EXTRAS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/globalattn demo --html globalattn-demo/demo.html

test: setup lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests benchmarks examples

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
