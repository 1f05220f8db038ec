# Two commands for a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first (a local CPU wheel); a bare `torch` requirement would pull CUDA builds.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

demo: install
	$(BIN)/python -m tutorials.demo_digits

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python -m benchmarks.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
