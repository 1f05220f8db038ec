# Two commands for a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first (a local CPU wheel); a bare `torch` requirement would pull CUDA builds.
# timm is installed without dependencies: its package import needs torchvision, so only its layer modules are used.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The constraints file holds torch==2.13.0, so the zoo extra (transformers, peft) cannot replace torch.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c .ci/constraints.txt -e ".[dev]"
	# timm without its dependencies (it would pull torchvision and a CUDA torch): tests load its norm layers only.
	$(BIN)/pip install -q --no-deps timm

demo: install
	$(BIN)/python -m tutorials.demo_digits

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python -m benchmarks.bench

# API reference site into site/ (mkdocs.yml); --strict turns every warning (a broken link, a bad docstring) into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
