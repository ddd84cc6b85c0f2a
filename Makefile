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

# Test sessions run side by side by `make test`. Most tests wait on peers, timeouts and restarts rather than on the
# CPU, so two workers take about 10 minutes against 16 for one on the 2-core machine; TEST_WORKERS=1 runs serially.
TEST_WORKERS ?= 2

# Benchmark scripts: every bench/*.py except helper modules whose name starts with "_".
BENCH_SCRIPTS = $(sort $(filter-out bench/_%,$(wildcard bench/*.py)))

.PHONY: venv run test test-deps bench-deps bench lint clean distclean

## venv (internal): create .venv if missing; (re)install the project only when pyproject.toml changed.
venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -e '.[test,dev]'
	touch $@

## run: migrate (creating the database if missing), then run api, poller, gate, pruner and notifier in the foreground.
run: venv
	mkdir -p var
	$(BIN)/healthgate migrate
	exec $(BIN)/healthgate up

## test-deps: system packages the test suite and benchmarks need beyond the virtualenv: nginx (a real HTTP/TLS
## peer for the poller's checks; tests run their own nginx processes, the system service is never started),
## dnsmasq-base (a real DNS server for dns checks, run by tests/support/dns_server.py on 127.0.0.1; the package
## has no system service) and Debian's Chromium with its driver and fonts (/usr/bin/chromium, driven by
## Playwright in tests/test_dashboard.py; no browser is ever downloaded). Installs with apt-get (as root) only what is missing; a temporary policy-rc.d
## keeps a package from starting its service.
test-deps:
	@missing=; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "test-deps: installing$$missing"; \
	policy=/usr/sbin/policy-rc.d; made_policy=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && made_policy=1; fi; \
	apt-get update -qq; status=$$?; \
	case "$$missing" in *nginx*) if [ $$status -eq 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; status=$$?; fi;; esac; \
	case "$$missing" in *dnsmasq*) if [ $$status -eq 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base; \
		status=$$?; fi;; esac; \
	case "$$missing" in *chromium*) if [ $$status -eq 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-liberation; status=$$?; fi;; esac; \
	if [ -n "$$made_policy" ]; then rm -f $$policy; fi; \
	if [ $$status -ne 0 ]; then echo "test-deps: could not install$$missing (apt-get needs root)" >&2; exit $$status; fi

## bench-deps: system packages the benchmarks need beyond test-deps: wrk (HTTP load generator) and Prometheus'
## blackbox_exporter (the Go prober bench/poller.py compares against). Installed with apt-get (as root) only when
## missing; a temporary policy-rc.d keeps the exporter's system service from starting (the benchmark runs its own).
bench-deps: test-deps
	@missing=; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	command -v prometheus-blackbox-exporter >/dev/null 2>&1 || [ -x /usr/bin/prometheus-blackbox-exporter ] \
		|| missing="$$missing prometheus-blackbox-exporter"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "bench-deps: installing$$missing"; \
	policy=/usr/sbin/policy-rc.d; made_policy=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && made_policy=1; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	status=$$?; \
	if [ -n "$$made_policy" ]; then rm -f $$policy; fi; \
	if [ $$status -ne 0 ]; then echo "bench-deps: could not install$$missing (apt-get needs root)" >&2; exit $$status; fi

## test: the whole test suite, in TEST_WORKERS processes (pytest-xdist; each worker is a test session of its own,
## with its own database, exchange and services); extra pytest arguments in PYTEST_ARGS.
test: export HEALTHGATE_TEST_DATABASE_URL ?= $(TEST_DATABASE_URL)
test: export HEALTHGATE_TEST_AMQP_URL ?= $(TEST_AMQP_URL)
test: venv test-deps
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## bench: run every benchmark script in bench/.
bench: export HEALTHGATE_TEST_DATABASE_URL ?= $(TEST_DATABASE_URL)
bench: export HEALTHGATE_TEST_AMQP_URL ?= $(TEST_AMQP_URL)
bench: export HEALTHGATE_BENCH_DATABASE_URL ?= $(TEST_DATABASE_URL)
bench: export HEALTHGATE_BENCH_AMQP_URL ?= $(TEST_AMQP_URL)
bench: venv bench-deps
ifeq ($(strip $(BENCH_SCRIPTS)),)
	@echo "bench: no benchmark scripts in bench/"
else
	@set -e; for script in $(BENCH_SCRIPTS); do \
		echo "==> $$script"; \
		$(BIN)/python "$$script"; \
	done
endif

## lint: static checks: ruff (lint rules, then formatting of the Python files), then mypy in strict mode on shared/ and services/
## (configured in pyproject.toml, [tool.mypy]).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## clean: caches and build output. Keeps .venv and var/ (var/ holds the key file: never delete it casually).
clean:
	rm -rf build dist .pytest_cache .ruff_cache .mypy_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

## distclean: clean, and remove the virtualenv too.
distclean: clean
	rm -rf $(VENV)
