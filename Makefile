# Two commands on a fresh machine:  `make run` (a federated run) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench lock

install: $(VENV)/.installed

EXTRAS := dev,postgres,ray,pretrained,profile

# torch is pinned and installed first: a plain `torch` would pull several GB of CUDA wheels.
# constraints.txt pins every package (direct and transitive), so a new release elsewhere cannot change
# what a fresh install gets; `make lock` is the deliberate way to move those pins (see the README).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Re-resolve every dependency to its newest allowed release in a scratch venv and rewrite
# constraints.txt; review the diff, run `make test`, commit both together.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet torch==2.13.0
	.venv-lock/bin/pip install --quiet -e ".[$(EXTRAS)]"
	( echo "# Every package a fresh install gets, pinned; regenerate with 'make lock' (README: upgrading)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//' | LC_ALL=C sort -f ) > constraints.txt
	rm -rf .venv-lock

run: install
	$(BIN)/facefl simulate --devices 20 --rounds 3 --local-epochs 5 --model small --data synthetic --json runs/simulate.json

# two worker processes, one per core; --dist loadfile keeps a file's tests (and its module-scoped live
# servers) on one worker
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/server_throughput.py
