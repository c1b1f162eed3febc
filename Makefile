# Every target is listed by `make help`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create the virtual environment and install the platform and its test tools

.PHONY: run
run: install ## Start web (:8000), worker, beat and Flower (:5555) in the foreground; Ctrl-C stops all
	$(BIN)/python -m deploy.launch

.PHONY: test
test: install ## Run lint and the whole test suite (needs Redis and MariaDB; see README)
	$(BIN)/ruff check webapp tasks models deploy bench tests
	$(BIN)/python -m pytest

.PHONY: lint
lint: install ## Check style and complexity with ruff
	$(BIN)/ruff check webapp tasks models deploy bench tests

.PHONY: models
models: install ## Retrain and export the reference models (installs the train extra)
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,train]'
	$(BIN)/python -m models.training

.PHONY: bench
bench: install ## Run the HTTP benchmark against in-process onnxruntime and a FastAPI baseline
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,bench]'
	$(BIN)/python -m bench.http

.PHONY: bench-jobs
bench-jobs: install ## Run the job benchmark: batching on and off against a BRPOP reference (needs Redis)
	$(BIN)/python -m bench.jobs

.PHONY: bench-batch
bench-batch: install ## Run the batch benchmark: a run over 200,000 rows on MariaDB against the read-and-write floor
	$(BIN)/python -m bench.batch

.PHONY: bench-cache
bench-cache: install ## Run the prediction-cache benchmark: hits, misses and no cache on digits-heavy and iris (needs Redis)
	$(BIN)/python -m bench.cache

.PHONY: loadtest
loadtest: install ## Run the load test: the whole platform under mixed Locust traffic, 20 users for 60 s (its own Redis, SQLite)
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,bench]'
	$(BIN)/python -m bench.loadtest

.PHONY: lock
lock: install ## Pin every dependency anew in requirements.lock (after a change to pyproject.toml)
	$(BIN)/pip install --quiet -c requirements.lock pip-tools
	$(BIN)/pip-compile --quiet --all-extras --strip-extras --no-header --no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock pyproject.toml

.PHONY: clean
clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
