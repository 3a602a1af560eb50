# ctr: daily-retrained CTR pipeline. `make demo` and `make test` are the two commands.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROOT := $(abspath .)

export AIRFLOW_HOME := $(ROOT)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(ROOT)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(ROOT)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := True
export AIRFLOW__API__HOST := 127.0.0.1
export AIRFLOW__API__PORT := 8080
export CTR_HOME ?= $(ROOT)/state
export PATH := $(ROOT)/$(BIN):$(PATH)

DAYS ?= 8
ROWS ?= 50000
# The holdout day of the demo run; defaults to the last generated day.
DATE ?=
# pytest-xdist workers for `make test`: test modules run two at a time (one worker per core here);
# TEST_WORKERS=0 runs the suite in this one process, in file order
TEST_WORKERS ?= 2

.PHONY: venv demo test airflow stop bench lint clean node-deps system-deps jars

venv: $(BIN)/.installed jars

$(BIN)/.installed: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	@touch $@

# SynapseML's LightGBM + hadoop-azure jars for the Spark job (jobs/synapseml/pom.xml), from Maven Central
# into the venv, where ctr finds them ($(JARS)); every checksum verified (-C). Offline (-o) once fetched
# into ~/.m2; skipped while the stamp is newer than the pom.
JARS := $(VENV)/share/ctr/jars
MVN_FLAGS := -B -q -C -f jobs/synapseml/pom.xml dependency:copy-dependencies -DoutputDirectory=$(abspath $(JARS))
jars: $(JARS)/.installed
$(JARS)/.installed: jobs/synapseml/pom.xml | $(BIN)/.installed
	@command -v mvn >/dev/null 2>&1 || { echo "make jars: mvn not found; install Maven (Debian: apt-get install maven; needs a JDK 17, e.g. apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }
	@rm -rf $(JARS) && mkdir -p $(JARS)
	@mvn -o $(MVN_FLAGS) >/dev/null 2>&1 || mvn $(MVN_FLAGS)
	@ls $(JARS)/*.jar | sed 's|.*/||' > $(JARS)/jars.txt
	@echo "jars: $$(wc -l < $(JARS)/jars.txt) jars, $$(du -sh $(JARS) | cut -f1) in $(JARS)"
	@touch $@

demo: venv
	$(BIN)/python -m ctr.demo --days $(DAYS) --rows-per-day $(ROWS) $(if $(DATE),--date $(DATE))

test: venv node-deps system-deps
	$(BIN)/ruff check plugins dags jobs tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# npm packages the tests start (Azurite), pinned in package.json / package-lock.json
node-deps: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian packages the tests drive (headless Chromium for the UI check, PostgreSQL for the live-Airflow
# tests' metadata DB); needs root, as in CI
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "system-deps: chromium missing and not root; the browser check will be skipped"; fi; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "system-deps: PostgreSQL server missing and not root: apt-get install postgresql (the live-Airflow tests need it)" >&2; exit 1; fi; }

# Airflow UI on 127.0.0.1:8080 (scheduler, dag-processor, triggerer, api-server) with this repo's DAG.
# Sample landing days up to today (if missing): train_days + 3 of them, so the scheduled run (holding out
# yesterday or the day before) and a run triggered from the UI (holding out today) both find their data.
# ctr_retrain starts paused: tick "Unpause ctr_retrain on trigger" in the trigger dialog (docs/operations.md).
AIRFLOW_ROWS ?= 20000
# The metadata DB of `make airflow` is sqlite in $(AIRFLOW_HOME) (a laptop). Opt in to PostgreSQL, what production
# runs, with its SQLAlchemy URL: make airflow AIRFLOW_DB=postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow
AIRFLOW_DB ?=
AIRFLOW_DB_ENV := $(if $(AIRFLOW_DB),AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=$(AIRFLOW_DB))
airflow: venv
	$(BIN)/python -c "import datetime as dt; from ctr.demo import ensure_landing; from ctr.settings import Settings; \
	  ensure_landing(Settings.from_env(), dt.datetime.now(dt.UTC).date(), $(DAYS) + 3, $(AIRFLOW_ROWS))"
	$(AIRFLOW_DB_ENV) $(BIN)/airflow db migrate >/dev/null
	@echo "Airflow UI on http://127.0.0.1:8080 (user admin; password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated once it starts); metadata DB: $(if $(AIRFLOW_DB),PostgreSQL (AIRFLOW_DB),sqlite in $(AIRFLOW_HOME))"
	$(AIRFLOW_DB_ENV) $(BIN)/airflow standalone

stop: venv
	$(BIN)/python -m ctr.demo --stop

bench: venv
	$(BIN)/python benchmarks/run_all.py

lint: venv
	$(BIN)/ruff check plugins dags jobs tests benchmarks

clean:
	rm -rf $(VENV) .airflow state
