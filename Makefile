# `make demo` and `make test` each create .venv on first use (pip only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint clean

demo: $(VENV)/.installed-demo
	$(BIN)/pipeline shard embedded:faces --out data/faces --val-fraction 0.2 \
		--seed 0 --maxcount 32 --overwrite
	rm -rf runs/demo
	NPROC=2 PYTHON=$(BIN)/python bash launch/torchrun.sh configs/demo.yaml
	$(BIN)/pipeline eval --run-dir runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check pipeline tests benchmarks scripts

$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$*]'
	touch $@

clean:
	rm -rf runs data .pytest_cache
