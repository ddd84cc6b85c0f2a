# healthgate — developer entry points (README "Quick start").
# `make run` and `make test` do all set-up themselves: virtualenv, install, database, migrations.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Local services used by the test suite and the benchmarks; override on the command line or in the
# environment (a value already set is kept).
TEST_DATABASE_URL := postgresql://postgres@127.0.0.1:5432/postgres
TEST_AMQP_URL     := amqp://guest:guest@127.0.0.1:5672/

# Benchmark scripts: every bench/*.py except helper modules whose name starts with "_".
BENCH_SCRIPTS = $(sort $(filter-out bench/_%,$(wildcard bench/*.py)))

.PHONY: venv run test test-deps bench lint clean distclean

## venv (internal): create .venv if missing; (re)install the project only when pyproject.toml changed.
venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -e '.[test,dev]'
	touch $@

## run: migrate (creating the database if missing), then run api, poller, gate and pruner in the foreground.
run: venv
	mkdir -p var
	$(BIN)/healthgate migrate
	exec $(BIN)/healthgate up

## test-deps: system packages the test suite needs beyond the virtualenv (none yet).
test-deps:
	@echo "test-deps: no system packages needed yet"

## test: the whole test suite; extra pytest arguments in PYTEST_ARGS.
test: export HEALTHGATE_TEST_DATABASE_URL ?= $(TEST_DATABASE_URL)
test: export HEALTHGATE_TEST_AMQP_URL ?= $(TEST_AMQP_URL)
test: venv test-deps
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: run every benchmark script in bench/.
bench: export HEALTHGATE_TEST_DATABASE_URL ?= $(TEST_DATABASE_URL)
bench: export HEALTHGATE_TEST_AMQP_URL ?= $(TEST_AMQP_URL)
bench: export HEALTHGATE_BENCH_DATABASE_URL ?= $(TEST_DATABASE_URL)
bench: export HEALTHGATE_BENCH_AMQP_URL ?= $(TEST_AMQP_URL)
bench: venv
ifeq ($(strip $(BENCH_SCRIPTS)),)
	@echo "bench: no benchmark scripts in bench/"
else
	@set -e; for script in $(BENCH_SCRIPTS); do \
		echo "==> $$script"; \
		$(BIN)/python "$$script"; \
	done
endif

## lint: static checks (formatting is not enforced).
lint: venv
	$(BIN)/ruff check .

## clean: caches and build output. Keeps .venv and var/ (var/ holds the key file: never delete it casually).
clean:
	rm -rf build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

## distclean: clean, and remove the virtualenv too.
distclean: clean
	rm -rf $(VENV)
