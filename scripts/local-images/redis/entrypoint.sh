#!/bin/sh
# `redis-server ARGS` without a config file: listen on every interface with protected
# mode off (the official image's behaviour), so containers on the compose network reach it.
set -eu
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ] && [ ! -f "${2:-}" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
