# Two commands matter: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := $(CURDIR)/.demo
DEMO_ENV := DAGSTER_HOME=$(DEMO)/dagster_home \
	WORKER_TRANSPORT=local WORKER_COMMAND=$(CURDIR)/$(VENV)/bin/clinic-migrate \
	LEGACY_DB_URL=sqlite:///$(DEMO)/legacy.db CLINICAL_DB_URL=sqlite:///$(DEMO)/clinical.db \
	DJANGO_DB_URL=sqlite:///$(DEMO)/django.db FIRESTORE_PROJECT=demo-migration \
	MEDIA_TRANSPORT=local MEDIA_ROOT=$(DEMO)/media BLOB_STORE_URL=$(DEMO)/blobs

.PHONY: install demo dev test lint check verify sshd chromium bench bench-app bench-checks report health clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

## make demo: demo legacy data (SQLite), partitions, a full migration of every sistema, a summary
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(DEMO_ENV) $(PY) -m demo.run

## make dev: the Dagster UI and daemon on the demo data (http://127.0.0.1:3000, PORT=… to change),
## started the way production runs them (not `dagster dev`/`dg dev`, which would warn about the
## project's own production dagster.yaml sitting beside the demo's DAGSTER_HOME)
dev: install
	test -f $(DEMO)/clinical.db || $(MAKE) demo
	$(PY) -m demo.firestore_emulator --port 8686 & emulator=$$!; \
	$(DEMO_ENV) FIRESTORE_EMULATOR_HOST=127.0.0.1:8686 $(VENV)/bin/dagster-daemon run -w workspace.yaml & daemon=$$!; \
	trap 'kill $$daemon $$emulator 2>/dev/null' EXIT INT TERM; \
	$(DEMO_ENV) FIRESTORE_EMULATOR_HOST=127.0.0.1:8686 \
	$(VENV)/bin/dagster-webserver -w workspace.yaml -h 127.0.0.1 -p $(or $(PORT),3000)

## make test: lint + the whole suite (real MariaDB, PostgreSQL, sshd, the Firestore emulator, chromium)
test: install sshd chromium lint
	$(VENV)/bin/pytest -ra

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## the definitions as Dagster sees them
check: install
	$(PY) -m demo.instance $(DEMO)/dagster_home
	$(DEMO_ENV) $(VENV)/bin/dg check defs
	$(DEMO_ENV) $(VENV)/bin/dagster definitions validate -m migration_assets.definitions

## Debian's chromium for the coverage report's browser test (driven by Playwright; never `playwright install`)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## checks run alone for one partition on the demo instance: make verify ENTITY=patients PARTITION=HSJ [CHECK=integrity]
## (the app entities' while `make dev` runs: their documents live in its Firestore emulator)
verify: install
	$(DEMO_ENV) FIRESTORE_EMULATOR_HOST=$(or $(FIRESTORE_EMULATOR_HOST),127.0.0.1:8686) \
	$(PY) -m checks.run --entity $(ENTITY) --partition $(PARTITION) $(if $(CHECK),--check $(CHECK))

## OpenSSH's sshd for the SSH integration tests (Debian/Ubuntu, as root)
sshd:
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd || { \
		echo "installing openssh-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; }

## benchmarks: the clinical worker beside the floor (mariadb | psql \copy) and Sling, all in one run
## (default 500k patients + 750k encounters; N=… to change), and the app path beside a raw Firestore loop
bench: install sshd
	$(PY) -m bench.clinical $(if $(N),--patients $(N))

bench-app: install sshd
	$(PY) -m bench.app $(if $(N),--users $(N)) $(ARGS)

## the clinical integrity check (clinic-migrate verify) on a 500k-row patients partition, beside the floor of
## reading both sides (N=… patients to change); run it alone: the machine has 2 cores
bench-checks: install
	$(PY) -m bench.checks $(if $(N),--patients $(N))

## reports/coverage.json and reports/coverage.html from the latest check results of the demo instance
report: install
	$(DEMO_ENV) $(PY) -m checks.report

## every component the migrations need (SSH, the worker and its version, each database, Firestore, the blob
## store) as JSON; exit 1 when one is down, 2 when a variable is missing. On the demo's settings (Firestore: the
## emulator of `make dev`) unless LEGACY_DB_URL is set: then on the environment's, as in production
health: install
	$(if $(LEGACY_DB_URL),,$(DEMO_ENV) FIRESTORE_EMULATOR_HOST=$(or $(FIRESTORE_EMULATOR_HOST),127.0.0.1:8686)) \
	$(PY) -m migration_assets.operations.health $(if $(TIMEOUT),--timeout $(TIMEOUT))

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
