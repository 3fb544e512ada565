#!/usr/bin/env bash
# Build selfprog-trainer:latest (Dockerfile.trainer): the service image of compose's
# migrate, coordinator and worker services. CPU torch by default, the same version as
# the sandbox image (the version of the wheel scripts/build-images.sh gives it);
# --cuda: torch with CUDA from the package index (for the `gpu` compose profile; tag it
# e.g. TRAINER_IMAGE=selfprog-trainer:cuda).
#
# CPU, where the sandbox's torch wheel is local (/opt/wheels/torch-2.13.0+cpu-*.whl or
# SELFPROG_TORCH_WHEEL): that wheel and every other dependency are downloaded by the
# host's pip into build/trainer-wheels/ (a cache: pip skips what is there); the build
# takes them from there and asks the package index only for what is missing. torchvision goes in only where a CPU build of it
# lies beside that wheel (only the mnist/cifar10/emnist file readers use it). Docker's
# layer cache makes a rebuild after a code change take seconds. Prints the time taken
# and the image size.
#
# Environment:
#   BASE_IMAGE             default selfprog-base:bookworm
#   TRAINER_IMAGE          default selfprog-trainer:latest
#   SELFPROG_TORCH_WHEEL   the sandbox's torch wheel ("none": use the index)
#   SELFPROG_TORCH_VERSION torch version when there is no wheel (default 2.13.0)
#   PIP                    the pip that downloads wheels (default: python3 -m pip)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${BASE_IMAGE:-selfprog-base:bookworm}"
TRAINER_IMAGE="${TRAINER_IMAGE:-selfprog-trainer:latest}"
PIP="${PIP:-python3 -m pip}"
variant=cpu
for arg in "$@"; do
    case "$arg" in
    --cuda) variant=cuda ;;
    *) echo "usage: $0 [--cuda]" >&2; exit 2 ;;
    esac
done
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || {
    echo "trainer-image.sh: base image $BASE_IMAGE is missing (scripts/base-image.sh makes it)" >&2; exit 1; }

t0=$SECONDS
wheel="${SELFPROG_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}"
[ -f "$wheel" ] || wheel=""
version="${SELFPROG_TORCH_VERSION:-2.13.0}"
if [ -n "$wheel" ]; then
    version="$(basename "$wheel" | cut -d- -f2)"      # 2.13.0+cpu
    version="${version%%+*}"
fi
args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH=$variant" --build-arg "TORCH_VERSION=$version")
if [ "$variant" = cpu ] && [ -n "$wheel" ]; then
    tv_wheel="$(ls "$(dirname "$wheel")"/torchvision-*+cpu-*.whl 2>/dev/null | head -n1 || true)"
    tv_version=""
    if [ -n "$tv_wheel" ]; then
        tv_version="$(basename "$tv_wheel" | cut -d- -f2)"
        tv_version="${tv_version%%+*}"
    else
        echo "trainer-image.sh: no CPU torchvision wheel beside $wheel: the image gets none"
    fi
    dest=build/trainer-wheels
    mkdir -p "$dest"
    find "$dest" -name 'torch-*.whl' ! -name "$(basename "$wheel")" -delete
    # the project's dependencies except torch and torchvision (installed above, pinned)
    mapfile -t reqs < <(python3 -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if d.split("=")[0].split(">")[0].split("<")[0].strip() not in ("torch", "torchvision")))')
    # Skipped when neither the dependency list nor the wheel changed (resolving against the index takes a
    # minute even when every wheel is there).
    stamp="$(printf '%s\n' "${reqs[@]}" "$wheel" "$tv_wheel" "$BASE_IMAGE" | sha256sum | cut -c1-16)"
    if [ "$(cat "$dest/.stamp" 2>/dev/null)" != "$stamp" ]; then
        # For the image's interpreter, not the host's (Requires-Python).
        # (grep: the host pip config names local index dirs that may not hold every project)
        pyver="$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import platform; print(platform.python_version())')"
        $PIP download --quiet --only-binary=:all: --python-version "$pyver" --dest "$dest" \
            "$wheel" ${tv_wheel:+"$tv_wheel"} "setuptools>=68" "${reqs[@]}" \
            2> >(grep -v "is ignored: it is neither" >&2)
        echo "$stamp" > "$dest/.stamp"
    fi
    # torch and torchvision come from the wheels (no CPU index needed); the index still
    # supplies what the host's pip left out (it evaluates markers such as
    # python_full_version for the host's interpreter, not the image's).
    args+=(--build-arg TORCH_CPU_INDEX= --build-arg "TORCHVISION_VERSION=$tv_version")
fi
echo "trainer-image.sh: building $TRAINER_IMAGE on $BASE_IMAGE (torch $version, $variant)"
docker build --network host -f Dockerfile.trainer -t "$TRAINER_IMAGE" "${args[@]}" . \
    2> >(grep -v -e "legacy builder is deprecated" -e "Install the buildx" -e "go/buildx" >&2)
echo "trainer-image.sh: $TRAINER_IMAGE in $((SECONDS - t0)) s," \
     "$(docker image inspect -f '{{.Size}}' "$TRAINER_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
