#!/usr/bin/env bash
# Build the three service images that docker-compose.yml otherwise pulls (redis,
# postgres, the Docker-API proxy) from the local base image with Debian's packages, for
# machines that reach no container registry. Idempotent: an image that exists is kept
# (SELFPROG_REBUILD_LOCAL=1 rebuilds). Prints how long each build took, then the
# variables that make compose use them, in env-file form (stdout; messages go to stderr):
#
#   bash scripts/local-images.sh > local-images.env
#   docker-compose --env-file local-images.env up -d     # or: docker compose --env-file ...
#
# Build contexts: scripts/local-images/{redis,postgres,docker-proxy}/. apt inside the
# build reaches the mirror named in the base image's sources over the host network
# (the engine here runs without a bridge).
#
# Environment:
#   BASE_IMAGE               default selfprog-base:bookworm (scripts/base-image.sh makes it)
#   SELFPROG_REDIS_IMAGE     default selfprog-redis:local
#   SELFPROG_POSTGRES_IMAGE  default selfprog-postgres:local
#   SELFPROG_PROXY_IMAGE     default selfprog-docker-proxy:local
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${BASE_IMAGE:-selfprog-base:bookworm}"
REDIS_IMAGE="${SELFPROG_REDIS_IMAGE:-selfprog-redis:local}"
POSTGRES_IMAGE="${SELFPROG_POSTGRES_IMAGE:-selfprog-postgres:local}"
PROXY_IMAGE="${SELFPROG_PROXY_IMAGE:-selfprog-docker-proxy:local}"

docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || {
    echo "local-images.sh: base image $BASE_IMAGE is missing (scripts/base-image.sh makes it)" >&2
    exit 1; }

build() {
    local image="$1" dir="$2" t0=$SECONDS
    if [ "${SELFPROG_REBUILD_LOCAL:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
        echo "local-images.sh: $image already exists" >&2
        return
    fi
    echo "local-images.sh: building $image from $dir on $BASE_IMAGE" >&2
    docker build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$image" "$dir" >/dev/null \
        2> >(grep -v -e "legacy builder is deprecated" -e "Install the buildx" -e "go/buildx" -e "^ *$" >&2)
    echo "local-images.sh: built $image in $((SECONDS - t0)) s" \
         "($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
}
build "$REDIS_IMAGE" scripts/local-images/redis
build "$POSTGRES_IMAGE" scripts/local-images/postgres
build "$PROXY_IMAGE" scripts/local-images/docker-proxy

printf 'SELFPROG_REDIS_IMAGE=%s\nSELFPROG_POSTGRES_IMAGE=%s\nSELFPROG_PROXY_IMAGE=%s\n' \
    "$REDIS_IMAGE" "$POSTGRES_IMAGE" "$PROXY_IMAGE"
