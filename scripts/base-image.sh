#!/usr/bin/env bash
# Make the local base image selfprog-base:bookworm (Debian bookworm minbase + Python 3)
# without a container registry: debootstrap a root filesystem and `docker import` it.
# Idempotent: does nothing when the image already exists (SELFPROG_REBUILD_BASE=1 forces).
#
# Users with registry access do not need this: they pass a public image as BASE_IMAGE
# to scripts/build-images.sh (see docs/docker.md).
#
# Environment:
#   SELFPROG_BASE_IMAGE    image name (default selfprog-base:bookworm)
#   SELFPROG_APT_MIRROR    Debian mirror (default: the first bookworm mirror in the apt sources)
set -euo pipefail

IMAGE="${SELFPROG_BASE_IMAGE:-selfprog-base:bookworm}"
SUITE=bookworm

if [ "${SELFPROG_REBUILD_BASE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base-image.sh: $IMAGE already exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: run scripts/docker-engine.sh first (installs debootstrap)" >&2; exit 1; }

# The machine reaches Debian only through the mirror its own apt sources name, so use
# that one. Both source formats: deb822 (URIs: ...) and one-line (deb URL suite ...).
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
        [ -f "$f" ] || continue
        case "$f" in
        *.sources)
            # the URIs of a stanza whose Suites include the plain suite (not -security)
            awk -v suite="$SUITE" '
                /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri=""; ok=0; next }
                /^URIs:/ { uri=$2 }
                /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok=1 }
                END { if (uri != "" && ok) print uri }' "$f" | head -n1
            ;;
        *)
            awk -v suite="$SUITE" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2; exit }
                                   $1 == "deb" && $3 ~ /^\[/ && $4 == suite { print $3; exit }' "$f" | head -n1
            ;;
        esac
    done | grep -m1 . || true
}
MIRROR="${SELFPROG_APT_MIRROR:-$(find_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

ROOTFS="$(mktemp -d /var/tmp/selfprog-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

echo "base-image.sh: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    echo "base-image.sh: debootstrap failed; last lines:" >&2; tail -n 30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"

# pip inside `docker build` goes through the same TLS-inspecting path as the host, so
# the image must trust exactly what the host trusts.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
# Smaller image: package caches and lists are not needed at run time.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*

tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "base-image.sh: made $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
