#!/usr/bin/env bash
# Build selfprog-sandbox:latest from Dockerfile.sandbox (and, with --trainer,
# selfprog-trainer:latest from Dockerfile.trainer by scripts/trainer-image.sh, with the
# same torch version; --cuda: its CUDA variant).
#
# The sandbox build context is staged in build/sandbox-context/ (ignored by git): the
# harness package and a wheels/ directory. Where the CPU torch wheel lies on this machine
# (/opt/wheels), it and the other wheels are downloaded there by the host's pip first,
# so the image build needs no index at all; elsewhere pip inside the build uses the
# package index (hence --network host: the daemon runs without a bridge).
#
# Environment:
#   BASE_IMAGE           default selfprog-base:bookworm (scripts/base-image.sh)
#   SANDBOX_IMAGE        default selfprog-sandbox:latest
#   TRAINER_IMAGE        default selfprog-trainer:latest
#   SELFPROG_TORCH_WHEEL the torch wheel to use (default: /opt/wheels/torch-2.13.0+cpu-*.whl)
#   PIP                  the pip that downloads wheels (default: python3 -m pip)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${BASE_IMAGE:-selfprog-base:bookworm}"
SANDBOX_IMAGE="${SANDBOX_IMAGE:-selfprog-sandbox:latest}"
TRAINER_IMAGE="${TRAINER_IMAGE:-selfprog-trainer:latest}"
build_trainer=0
trainer_flags=()
for arg in "$@"; do
    case "$arg" in
    --trainer) build_trainer=1 ;;
    --cuda) trainer_flags+=(--cuda) ;;
    *) echo "usage: $0 [--trainer [--cuda]]" >&2; exit 2 ;;
    esac
done

docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || {
    echo "build-images.sh: base image $BASE_IMAGE is missing (scripts/base-image.sh makes it)" >&2; exit 1; }

ctx=build/sandbox-context
rm -rf "$ctx/sandbox"
mkdir -p "$ctx/wheels" "$ctx/sandbox"
# Only the modules that run inside a sandbox: SANDBOX_MODULES of sandbox/protocol.py,
# the same tuple sandbox/backends/staging.py stages into each job's lib/. Never
# backends/, the gate or pipeline/ (trusted-side code). protocol.py is standard library
# only, so any python3 can read the tuple.
modules=$(python3 sandbox/protocol.py)
[ -n "$modules" ] || { echo "build-images.sh: no SANDBOX_MODULES" >&2; exit 1; }
for f in $modules; do cp "sandbox/$f" "$ctx/sandbox/$f"; done

wheel="${SELFPROG_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    # The wheels dir is a cache: pip download skips what is already there.
    PIP="${PIP:-python3 -m pip}"
    # (grep: the host pip config names local index dirs that may not hold every project)
    $PIP download --quiet --only-binary=:all: --dest "$ctx/wheels" \
        "$wheel" transformers safetensors numpy 2> >(grep -v "is ignored: it is neither" >&2)
    # torch-2.13.0+cpu-cp311-... -> torch==2.13.0+cpu, found in wheels/ by --find-links
    build_args+=(--build-arg "TORCH_SPEC=torch==$(basename "$wheel" | cut -d- -f2)" \
                 --build-arg OFFLINE_WHEELS=1)
fi
# Keep the context tidy: only one torch wheel (a different one from an older run wastes
# hundreds of MB of context).
if [ -n "$wheel" ]; then
    find "$ctx/wheels" -name 'torch-*.whl' ! -name "$(basename "$wheel")" -delete
fi
echo "build-images.sh: building $SANDBOX_IMAGE on $BASE_IMAGE (context $(du -sh "$ctx" | cut -f1))"
docker build --network host -f Dockerfile.sandbox -t "$SANDBOX_IMAGE" "${build_args[@]}" "$ctx"

if [ "$build_trainer" = 1 ]; then
    BASE_IMAGE="$BASE_IMAGE" TRAINER_IMAGE="$TRAINER_IMAGE" SELFPROG_TORCH_WHEEL="${wheel:-none}" \
        bash scripts/trainer-image.sh "${trainer_flags[@]}"
fi
