# Two commands on a fresh machine:  `make run` (a federated run) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench

install: $(VENV)/.installed

# torch is pinned and installed first: a plain `torch` would pull several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,postgres,ray,pretrained]"
	touch $@

run: install
	$(BIN)/facefl simulate --devices 20 --rounds 3 --local-epochs 5 --model small --data synthetic --json runs/simulate.json

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/server_throughput.py
