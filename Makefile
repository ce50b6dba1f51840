# Every target that needs the virtualenv builds it first (scripts/bootstrap.sh is quick when nothing changed).
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := imagegen tests bench

.PHONY: setup demo demo-stop test format lint typecheck check bench

setup:
	@bash scripts/bootstrap.sh

## The two commands of the README
demo: setup
	@$(BIN)/python -m imagegen.dev.devstack up

# Three test processes, each with its own Redis, PocketBase and SeaweedFS (most tests wait on a fault window or
# a worker, not the CPU: on two cores three overlap those waits best); a long test never holds the others up
# (worksteal). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=30

demo-stop:
	@$(BIN)/python -m imagegen.dev.devstack down

## Tooling
format: setup
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: setup
	$(BIN)/mypy imagegen tests bench

check: lint typecheck test

## Side-by-side figures (not part of the tests)
bench: setup
	$(BIN)/python -m bench --profile
