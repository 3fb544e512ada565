# The two commands of the README:
#   make launch   set up, then run a quick self-programming run on the embedded default
#   make test     set up, start PostgreSQL, Redis and a Docker engine, run every test
#
# As root the virtual environment lives in /opt/selfprog/venv: the process sandbox runs
# candidates as unprivileged uids, which must be able to execute the interpreter (a venv
# under a 0700 home directory would not do). Override with VENV=...
ifeq ($(shell id -u),0)
VENV ?= /opt/selfprog/venv
else
VENV ?= .venv
endif
# Debian's interpreter: its standard library is readable by every uid.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
BIN := $(VENV)/bin
PRESET ?= quick
PYTEST_ARGS ?=

.PHONY: setup launch test services docker clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

launch: setup
	$(BIN)/selfprog-cli launch --preset $(PRESET)

services:
	bash scripts/services.sh

docker:
	bash scripts/ci-docker.sh

test: setup services docker
	SELFPROG_REQUIRE_DOCKER=1 \
	SELFPROG_TEST_POSTGRES_URL=$${SELFPROG_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test} \
	SELFPROG_TEST_REDIS_URL=$${SELFPROG_TEST_REDIS_URL:-redis://127.0.0.1:6379/15} \
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf selfprog.db selfprog-artifacts
