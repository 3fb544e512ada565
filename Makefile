# The two commands of the README:
#   make launch   set up, then run a quick self-programming run on the embedded default
#   make test     set up, start PostgreSQL, Redis and a Docker engine, run every test (CI)
#   make test-fast  the edit-test loop: unit, property and store tests, the web view in
#                 headless Chromium, and one end-to-end embedded run; no sandbox attack,
#                 Docker or service test (a few minutes)
# The lab service (docker-compose.yml, docs/deploy.md):
#   make stack-up     build what is missing and bring the stack up beside the host's
#                     services (ports STACK_REDIS_PORT/STACK_POSTGRES_PORT, stack.env)
#   make stack-down   stop it (data volumes kept; `$(COMPOSE) --env-file stack.env down -v` drops them)
#   make test-stack   the end-to-end test of the stack (tests/service/test_stack.py)
#
# As root the virtual environment lives in /opt/selfprog/venv: the process sandbox runs
# candidates as unprivileged uids, which must be able to execute the interpreter (a venv
# under a 0700 home directory would not do). Override with VENV=...
ifeq ($(shell id -u),0)
VENV ?= /opt/selfprog/venv
else
VENV ?= .venv
endif
# The process sandbox's own environment (sandbox/backends/runtime.py): the image's package
# set only, never the venv above (it holds the data sets with their labels).
SANDBOX_PREFIX ?= $(or $(SELFPROG_SANDBOX_PYTHON_PREFIX),/opt/selfprog/sandbox-runtime)
# Debian's interpreter: its standard library is readable by every uid.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
BIN := $(VENV)/bin
PRESET ?= quick
PYTEST_ARGS ?=

# Compose v2 where the plugin is installed, else Debian's Compose 1.29
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
STACK_REDIS_PORT ?= 16379
STACK_POSTGRES_PORT ?= 15432
STACK_WEB_PORT ?= 18000

# browser: Debian's chromium, for the web view's tests (tests/web/, scripts/browser.sh)
.PHONY: setup launch test test-fast services docker bubblewrap browser clean stack-images stack-up stack-down test-stack

# bubblewrap: the process sandbox backend runs candidates under it (installed as root)
setup: $(VENV)/.installed bubblewrap $(SANDBOX_PREFIX)/selfprog-runtime.txt

$(SANDBOX_PREFIX)/selfprog-runtime.txt: $(VENV)/.installed sandbox/backends/runtime.py
	bash scripts/sandbox-runtime.sh $(BIN)/python $(SANDBOX_PREFIX)

bubblewrap:
	bash scripts/bubblewrap.sh

browser:
	bash scripts/browser.sh

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

test: setup services docker browser
	SELFPROG_REQUIRE_DOCKER=1 SELFPROG_TEST_STACK=$${SELFPROG_TEST_STACK:-1} \
	SELFPROG_TEST_POSTGRES_URL=$${SELFPROG_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test} \
	SELFPROG_TEST_REDIS_URL=$${SELFPROG_TEST_REDIS_URL:-redis://127.0.0.1:6379/15} \
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Images for the stack without a registry: Redis, PostgreSQL and the API proxy from the
# local base image, and the service image (CPU torch, the sandbox's version).
stack-images: docker
	bash scripts/local-images.sh >/dev/null
	bash scripts/trainer-image.sh

stack.env: scripts/local-images.sh
	bash scripts/local-images.sh > $@.tmp
	printf 'SELFPROG_REDIS_PORT=%s\nSELFPROG_POSTGRES_PORT=%s\nSELFPROG_WEB_PORT=%s\n' $(STACK_REDIS_PORT) $(STACK_POSTGRES_PORT) $(STACK_WEB_PORT) >> $@.tmp
	printf 'SELFPROG_WEB_TOKEN=%s\n' "$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >> $@.tmp
	mv $@.tmp $@

stack-up: stack-images stack.env
	$(COMPOSE) --env-file stack.env up -d
	@echo "export SELFPROG_BROKER_URL=redis://127.0.0.1:$$(sed -n 's/^SELFPROG_REDIS_PORT=//p' stack.env)/0"
	@echo "export SELFPROG_DATABASE_URL=postgresql+psycopg2://selfprog:selfprog@127.0.0.1:$$(sed -n 's/^SELFPROG_POSTGRES_PORT=//p' stack.env)/selfprog"
	@echo "web view: http://127.0.0.1:$$(sed -n 's/^SELFPROG_WEB_PORT=//p' stack.env)/ (its token: SELFPROG_WEB_TOKEN in stack.env)"

stack-down:
	$(COMPOSE) --env-file stack.env down

test-stack: setup docker
	SELFPROG_TEST_STACK=1 PYTHONPATH=$(CURDIR) $(BIN)/python -m pytest -q -p no:cacheprovider tests/service/test_stack.py $(PYTEST_ARGS)

# The fast tier: every test of these files but the slow, Docker and sandbox-running ones
# (test_watch runs sandboxes, the loop files run whole runs), then ONE end-to-end run.
# It runs the selection rule (tests/pipeline/test_selection.py) and a cancel that stops a
# running sandbox (tests/pipeline/test_recovery.py, as root); tests/pipeline/test_layout.py
# fails if a change here drops either. tests/web takes about a minute and a half: a real
# browser over lineages written through the store API.
FAST_TESTS := tests/pipeline tests/web tests/sandbox/test_policy.py tests/sandbox/test_sandbox_modules.py
FAST_IGNORE := --ignore=tests/pipeline/test_loop.py --ignore=tests/pipeline/test_vision_loop.py \
	--ignore=tests/pipeline/test_watch.py
FAST_E2E := tests/pipeline/test_loop.py::test_quick_run_end_to_end[sqlite]

test-fast: setup services browser
	SELFPROG_TEST_POSTGRES_URL=$${SELFPROG_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test} \
	SELFPROG_TEST_REDIS_URL=$${SELFPROG_TEST_REDIS_URL:-redis://127.0.0.1:6379/15} \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not docker" \
		$(FAST_IGNORE) $(FAST_TESTS) $(PYTEST_ARGS)
	SELFPROG_TEST_POSTGRES_URL=$${SELFPROG_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test} \
	$(BIN)/python -m pytest -q -p no:cacheprovider '$(FAST_E2E)' $(PYTEST_ARGS)

clean:
	rm -rf selfprog.db selfprog-artifacts
