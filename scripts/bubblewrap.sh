#!/usr/bin/env bash
# bubblewrap (`bwrap`), which the process sandbox backend runs every candidate under
# (sandbox/backends/bwrap.py). As root with apt: installed from Debian's package (0.8 on
# bookworm) when missing. Otherwise only said: the `process` backend then refuses to
# start, `auto` picks Docker or refuses, and `--backend process-unconfined` (WEAKER,
# SECURITY.md) is the explicit way round it.
set -euo pipefail

if command -v bwrap >/dev/null; then
  echo "bubblewrap: $(bwrap --version)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "bubblewrap: installing Debian's package"
  apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null; }
  echo "bubblewrap: $(bwrap --version)"
else
  echo "bubblewrap: bwrap is missing; install it (apt-get install bubblewrap) for the process" \
       "sandbox backend, or use Docker" >&2
fi
