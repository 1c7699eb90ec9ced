# Two entry points for a fresh Debian/Ubuntu machine with Python >= 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint typecheck pytest chaos demo bench bench-full interop system-deps clean

# Debian/Ubuntu ship venv separately (python3-venv); install it when the first try fails.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing python3-venv"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv; \
	  fi; \
	  $(PYTHON) -m venv $(VENV); \
	}

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench,dev]'
	touch $(STAMP)

# $(call ensure,COMMAND:PACKAGE ...): apt-get install the Debian packages of the commands that are missing.
define ensure
	@missing=""; \
	for pair in $(1); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	  else \
	    echo "please install:$$missing (Debian/Ubuntu: apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi
endef

# redis-server for the tests' private servers, chromium for the dashboard's browser test.
system-deps:
	$(call ensure,redis-server:redis-server chromium:chromium)

lint: $(STAMP)
	$(BIN)/ruff check dispatcher tests bench interop worker.py enqueue.py

typecheck: $(STAMP)
	$(BIN)/mypy --strict dispatcher

pytest: $(STAMP) system-deps
	$(BIN)/pytest -q

test: lint typecheck pytest

# Issue 13's chaos run at full size (`make test` runs it at 5,000): 20,000 mails through `worker.py
# --concurrency 4`, seeded SMTP faults, kill -9 of a random pool child every 2-4 s and one Redis crash (AOF,
# appendfsync always); prints lost / duplicated / unknown / failed / delivered. DISPATCH_CHAOS_MAILS and
# DISPATCH_CHAOS_SEED change size and seed.
chaos: $(STAMP) system-deps
	DISPATCH_CHAOS_MAILS=$${DISPATCH_CHAOS_MAILS:-20000} $(BIN)/pytest tests/retry/test_chaos.py -q -s -p no:cacheprovider

demo: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || $(MAKE) system-deps
	$(BIN)/python -m dispatcher.dev.demo

bench: $(STAMP)
	$(BIN)/python -m bench --short

bench-full: $(STAMP)
	$(BIN)/python -m bench

# Our client and worker against real SMTP servers on 127.0.0.1 (interop/README.md). Each launcher unpacks
# its server under .interop-cache (DISPATCH_INTEROP_CACHE) and runs it privately: the machine's own MTA is
# never installed, replaced or used. Needs node/npm for smtp-server and Haraka; writes interop/results.md.
interop: $(STAMP) system-deps
	$(call ensure,node:nodejs npm:npm)
	$(BIN)/pytest interop -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
