#!/usr/bin/env bash
# Install (if missing) and start (if not running) a local Docker engine for the sandbox
# backend and its tests. Idempotent: safe to run again on a machine where it already ran.
#
# The daemon runs without iptables and without the default bridge: sandboxes use
# network "none", and image builds use "--network host", so neither needs NAT
# (and build machines here cannot program iptables anyway). overlay2 because vfs
# copies whole layers and makes every container start take tens of seconds.
#
# Environment:
#   SELFPROG_DOCKERD_LOG   daemon log file (default /var/log/selfprog-dockerd.log)
#   SELFPROG_DOCKERD_WAIT  seconds to wait for the daemon to answer (default 60)
set -euo pipefail

LOG="${SELFPROG_DOCKERD_LOG:-/var/log/selfprog-dockerd.log}"
WAIT="${SELFPROG_DOCKERD_WAIT:-60}"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "docker-engine.sh: must run as root (it installs packages and starts dockerd)" >&2
        exit 1
    fi
}

# Packages: the engine, Compose 1.29 (validates docker-compose.yml), debootstrap (the
# local base image, scripts/base-image.sh). Recommends are skipped: they pull in
# apparmor, git, needrestart... that nothing here uses.
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
# gVisor, for SELFPROG_SANDBOX_RUNTIME=runsc (and the runsc half of the Docker tests).
# Optional: where the package does not exist the engine runs without it.
if [ "${SELFPROG_INSTALL_RUNSC:-1}" = 1 ] && ! command -v runsc >/dev/null 2>&1; then
    if apt-cache show runsc >/dev/null 2>&1 || { apt-get update -qq && apt-cache show runsc >/dev/null 2>&1; }; then
        missing+=(runsc)
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    need_root
    echo "docker-engine.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package scripts try to start the service through systemd/init; where there
    # is none that fails harmlessly, so policy-rc.d tells them not to try.
    policy_rc_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_rc_created=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$policy_rc_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# Register runsc with the engine. --network=none: gVisor refuses to start in the network
# namespace Docker makes for "--network none" unless told there is no network at all;
# sandboxes never have one, so the runtime is registered that way (sandbox use only).
runsc_registered=0
if command -v runsc >/dev/null 2>&1; then
    mkdir -p /etc/docker
    python3 - "$(command -v runsc)" <<'PY'
import json, os, sys
path = "/etc/docker/daemon.json"
conf = json.load(open(path)) if os.path.exists(path) else {}
want = {"path": sys.argv[1], "runtimeArgs": ["--network=none"]}
if conf.get("runtimes", {}).get("runsc") != want:
    conf.setdefault("runtimes", {})["runsc"] = want
    with open(path + ".tmp", "w") as f:
        json.dump(conf, f, indent=2)
    os.replace(path + ".tmp", path)
PY
    runsc_registered=1
fi

if docker info >/dev/null 2>&1; then
    if [ "$runsc_registered" = 1 ] && ! docker info --format '{{json .Runtimes}}' | grep -q '"runsc"'; then
        # dockerd reloads its runtimes on SIGHUP; no restart, running containers stay.
        need_root
        kill -HUP "$(cat /var/run/docker.pid)"
        for _ in $(seq 1 20); do
            docker info --format '{{json .Runtimes}}' | grep -q '"runsc"' && break
            sleep 0.5
        done
    fi
    echo "docker-engine.sh: engine already running ($(docker info --format '{{.ServerVersion}} {{.Driver}} runtimes: {{range $k, $v := .Runtimes}}{{$k}} {{end}}'))"
    exit 0
fi

need_root
# A daemon that died leaves its pid file behind and then refuses to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi
if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "docker-engine.sh: starting dockerd (log: $LOG)"
    mkdir -p "$(dirname "$LOG")"
    # setsid + nohup: the daemon must outlive this script and the CI step that ran it.
    setsid nohup dockerd --iptables=false --bridge=none --storage-driver=overlay2 \
        >>"$LOG" 2>&1 </dev/null &
fi

for _ in $(seq 1 "$WAIT"); do
    if docker info >/dev/null 2>&1; then
        echo "docker-engine.sh: engine up ($(docker info --format '{{.ServerVersion}} {{.Driver}} runtimes: {{range $k, $v := .Runtimes}}{{$k}} {{end}}'))"
        exit 0
    fi
    sleep 1
done
echo "docker-engine.sh: dockerd did not answer within ${WAIT}s; last lines of $LOG:" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
