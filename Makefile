# cityedge — two commands: `make demo` and `make test`. Both set themselves up.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-core test-mp lint typecheck bench chaos firmware clean screenshots

# Debian packages the real-component tests and the demo use. Installed only when missing.
# PostgreSQL: the server binaries only; tests start their own throwaway cluster.
# Chromium: headless, renders the hardware checker's HTML report in its tests, and is the
# browser Playwright drives in the web console's tests (never a browser it downloads).
# Prometheus: its promtool checks and unit-tests the alert rules in deploy/prometheus.
# systemd (systemd-analyze) rates the units in deploy/systemd; Debian has it already.
# SoftHSM2: the PKCS#11 token the CA's intermediate key custody is tested with.
# RabbitMQ: the clustered broker (docs/BROKERS.md), three nodes in its tests; NATS: the
# other candidate, measured beside it by `make bench`. iproute2 (`ip netns`): the cluster's
# nodes on hosts of their own, partitioned (tests/support/netns.py; root, as CI runs).
DEBS := mosquitto mosquitto-clients openssl postgresql chromium prometheus softhsm2 rabbitmq-server nats-server iproute2
system-deps:
	@missing=""; for c in mosquitto mosquitto_sub openssl chromium promtool softhsm2-util nats-server ip; do command -v $$c >/dev/null || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	test -x /usr/lib/rabbitmq/bin/rabbitmq-server || missing=1; \
	if [ -n "$$missing" ]; then \
	  echo "cityedge: installing Debian packages: $(DEBS)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBS); \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: system-deps $(STAMP)

demo: setup
	$(BIN)/python -m cityedge.demo

# The suite runs on pytest-xdist workers, one test file per worker at a time, so a file's
# module fixtures (a broker, a built firmware) are made once; one worker per core (3 on 2
# cores took 17 min instead of about 22, but two tests that passed everywhere else failed
# in those runs: TEST_WORKERS=3 to try it). The longest files start first
# (tests/support/file_order.py, seconds in tests/file_seconds.txt), in that order
# (--no-loadscope-reorder).
TEST_WORKERS ?= $(shell python3 -c "import os; print(len(os.sched_getaffinity(0)))")
test: setup lint typecheck
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=30

# the console's pictures in the docs, taken by the browser tests
screenshots: setup
	CITYEDGE_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/fleet/test_console_browser.py

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench

# Fault injection at a large size (the small versions run in `make test`:
# tests/fleet/test_fleet_faults.py): prints fault | acknowledged | lost | duplicates
# stored | duplicate events | recovery time. CHAOS_DEVICES devices per fault, CHAOS_HERD
# for the herd; CHAOS_ENGINE=rabbitmq: on a three-node RabbitMQ cluster (the small sizes:
# tests/broker/test_rabbitmq_faults.py).
CHAOS_DEVICES ?= 40
CHAOS_HERD ?= 200
CHAOS_ENGINE ?= mosquitto
chaos: setup
	cd tests && ../$(BIN)/python -m support.chaos --engine $(CHAOS_ENGINE) $(CHAOS_DEVICES) $(CHAOS_HERD)

firmware: setup
	$(BIN)/python -m cityedge.build_firmware

clean:
	rm -rf build var .pytest_cache .mypy_cache .ruff_cache
