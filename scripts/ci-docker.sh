#!/usr/bin/env bash
# Everything the Docker backend tests need, from a bare machine: the engine, the local
# base image, the sandbox image; then a check that docker-compose.yml validates.
# Idempotent (each step skips what is already there) and prints how long each step took.
#
#   bash scripts/ci-docker.sh
#   SELFPROG_REQUIRE_DOCKER=1 python -m pytest -m docker tests/sandbox/test_docker_backend.py
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
    local name="$1"; shift
    local t0=$SECONDS
    echo "== ci-docker: $name"
    "$@"
    echo "== ci-docker: $name took $((SECONDS - t0)) s"
    timings+=("$name $((SECONDS - t0))s")
}
timings=()
start=$SECONDS

step "engine"        bash scripts/docker-engine.sh
step "base image"    bash scripts/base-image.sh
step "sandbox image" bash scripts/build-images.sh
step "compose config" docker-compose config -q

echo "== ci-docker: done in $((SECONDS - start)) s (${timings[*]})"
