# The commands people type. Every target that needs Python first makes sure
# .venv exists and holds the package as pyproject.toml describes it now.
#
#   make run            run a worker (configuration: BUDGET_* environment variables)
#   make test           the test suite (needs RabbitMQ and PostgreSQL on localhost)
#   make lint           ruff (lint and format), mypy, and the layers (import-linter)
#   make check          the worker's health check (broker and database reachable)
#   make compose-check  validate docker-compose.yml without a Docker engine
#   make bench          the benchmarks
#   make clean          caches and build output; `make distclean` also drops .venv
#
# ARGS (on the command line) is passed through: `make test ARGS='-k ledger -x'`, `make run ARGS=migrate`.

PYTHON ?= python3
VENV := .venv
ARGS :=

BIN := $(VENV)/bin
# Touched after a successful install: pip runs again only when pyproject.toml
# is newer, not on every command.
STAMP := $(VENV)/.installed

# The `docker compose` plugin where there is one, else Debian's docker-compose.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)

.DEFAULT_GOAL := help
.PHONY: help install run test lint check compose-check bench clean distclean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

install: $(STAMP)

# A failed `venv` (Debian without python3-venv has no ensurepip) leaves a
# half-made directory that would look finished next time: remove it.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$(PYTHON): not found or older than 3.11 (try 'make PYTHON=python3.11 ...')" >&2; exit 1; }
	@echo '$(PYTHON) -m venv $(VENV)'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "'$(PYTHON) -m venv' failed: on Debian, apt-get install python3-venv" >&2; exit 1; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(BIN)/budget-worker $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

check: $(STAMP)
	$(BIN)/budget-worker --check

compose-check:
	@command -v $(firstword $(COMPOSE)) >/dev/null 2>&1 || { echo "make compose-check: \
	'$(firstword $(COMPOSE))' not found: install docker-compose (Debian: apt-get install \
	docker-compose) or the docker compose plugin" >&2; exit 1; }
	$(COMPOSE) config -q

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
