# Two commands for a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first (a local CPU wheel); a bare `torch` requirement would pull CUDA builds.
# timm is installed without dependencies: its package import needs torchvision, so only its layer modules are used.
# The install runs once: $(STAMP) records it, and only a change to pyproject.toml or .ci/constraints.txt (or a
# missing .venv) installs again, so `make test` and `make demo` work offline after the first install.
# `make install` always reinstalls (it needs the package index).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: install demo test bench docs wheel-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The constraints file holds torch==2.13.0, so the zoo extra (transformers, peft) cannot replace torch.
# The stamp is written only after every step succeeded, so a failed install is retried by the next command.
$(STAMP): pyproject.toml .ci/constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c .ci/constraints.txt -e ".[dev]"
	# timm without its dependencies (it would pull torchvision and a CUDA torch): tests load its norm layers only.
	$(BIN)/pip install -q --no-deps timm
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tutorials.demo_digits

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench

# API reference site into site/ (mkdocs.yml); --strict turns every warning (a broken link, a bad docstring) into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Build the wheel and run it from a fresh venv outside the checkout (.ci/wheel_smoke.sh says how, offline).
wheel-smoke: $(STAMP)
	PYTHON=$(BIN)/python bash .ci/wheel_smoke.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
