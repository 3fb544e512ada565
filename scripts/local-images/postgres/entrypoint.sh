#!/bin/sh
# First start: make the cluster in $PGDATA (the volume) with POSTGRES_USER as superuser,
# POSTGRES_PASSWORD for network logins, and database POSTGRES_DB. Then run the server,
# listening on every interface of the container.
set -eu
bin=/usr/local/lib/postgresql-bin
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
if [ "${1:-postgres}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        # single-user mode: no server to start and stop just to create the database
        echo "CREATE DATABASE \"$db\" OWNER \"$user\";" \
            | "$bin/postgres" --single -j -D "$PGDATA" postgres >/dev/null
    fi
    echo "postgres-entrypoint: made the cluster (user $user, database $db)"
fi
if [ "${1:-postgres}" = postgres ]; then
    shift || true
    exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
