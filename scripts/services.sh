#!/usr/bin/env bash
# Start the PostgreSQL and Redis servers the tests talk to, if they are not running.
# On the build machines both are installed from Debian's packages; elsewhere, start
# your own and point SELFPROG_TEST_POSTGRES_URL / SELFPROG_TEST_REDIS_URL at them.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
pg_up && echo "services: PostgreSQL is up" || { echo "services: PostgreSQL is not running on 127.0.0.1:5432" >&2; exit 1; }

# The database the tests use (SELFPROG_TEST_POSTGRES_URL, default .../test): created when
# missing, so that a fresh server does not make the PostgreSQL tests skip (tests/conftest.py
# skips them only outside CI; under CI they fail).
pg_url="${SELFPROG_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test}"
pg_db="${pg_url##*/}"; pg_db="${pg_db%%\?*}"
case "$pg_url" in
  *@127.0.0.1:5432/*|*@localhost:5432/*)
    pg_user="${pg_url#*://}"; pg_user="${pg_user%%@*}"; pg_user="${pg_user%%:*}"
    if ! psql -h 127.0.0.1 -U "$pg_user" -d postgres -tAc \
         "SELECT 1 FROM pg_database WHERE datname = '$pg_db'" | grep -q 1; then
      echo "services: creating the PostgreSQL database $pg_db"
      createdb -h 127.0.0.1 -U "$pg_user" "$pg_db"
    fi
    echo "services: PostgreSQL database $pg_db is there" ;;
  *) echo "services: $pg_db is on another server; create it there if it is missing" ;;
esac

if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  fi
  for _ in $(seq 30); do redis_up && break; sleep 1; done
fi
redis_up && echo "services: Redis is up" || { echo "services: Redis is not running on 127.0.0.1:6379" >&2; exit 1; }
