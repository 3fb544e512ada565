"""Which confinement property each deny test of the attack suite relies on.

A deny test (tests/attacks/test_attacks.py, `test_attack_in_the_sandbox` and the warm
`test_attack_in_a_warm_sandbox`) names, per backend, the confinement properties
(sandbox/backends/base.py SABOTAGE_PROPERTIES) whose loss alone makes it fail, and for
each what its failure message then says. tests/attacks/test_sabotage.py switches each
property off (SELFPROG_SABOTAGE=<property>) and checks that exactly the tests naming it
fail, with that message. An attack listed for a backend with no property (`{}`) is
contained by two properties at once there (defence in depth): no single loss makes it
fail, only SELFPROG_SABOTAGE=1 (all of them) does.

Plain data, shared by the attack suite and the sabotage test (no test module imports
another).
"""
from __future__ import annotations

ATTACK_TEST = "tests/attacks/test_attacks.py::test_attack_in_the_sandbox"
WARM_TEST = "tests/attacks/test_attacks.py::test_attack_in_a_warm_sandbox"
CONTROL_TEST = "tests/attacks/test_attacks.py::test_backend_still_serves_after_the_attacks"

# Failure messages (substrings) the checks of test_attacks.py give, by cause.
FORKED_FREELY = "without hitting a limit"
ALLOCATED = "ALLOCATED"
REACHED = "the sandbox reached this host"
DNS_REACHED = "a DNS query reached this host"
READ = "READ "
HOST_VISIBLE = "the host filesystem is visible in the sandbox"
ENV_LEAK = "SELFPROG_TEST_ATTACK_SECRET"
WROTE = "WROTE"
ANSWERED = "ANSWERED"
DISK_FILLED = "DISK FILLED"
FLOOD_COMPLETE = "FLOOD COMPLETE"
SETUID = "'setuid0': 0"
SIGNAL_PERMITTED = "PERMITTED"
HOST_PIDS = "the sandbox sees the host's processes"
SURVIVED = "survived the run"
CAPS = "the sandbox holds capabilities"
NNP = "no_new_privs is off"
FILES_OPENED = "FILES OPENED"
CORE = "core dumps are allowed"
NO_CPU_BOUND = "no CPU bound"
SHARED_IPC = "the sandbox shares the host's IPC namespace"
SECRET_BACK = "a planted secret came back"
LEFT_FILES = "files the sandbox wrote outlive it on this host"
BEYOND = "beyond the sandbox's allow-list"
RAN_WRITTEN = "a binary the sandbox wrote ran"
RAN_NATIVE = "the sandbox built and ran native code with this host's compiler"

# attack -> backend -> {property: failure message}. Backends not listed: not a deny test.
DENY: dict[str, dict[str, dict[str, str]]] = {
    "fork_bomb": {"process": {"pids": FORKED_FREELY, "user": FORKED_FREELY},
                  "docker": {"pids": FORKED_FREELY}},
    "memory_bomb": {"process": {"memory": ALLOCATED}, "docker": {"memory": ALLOCATED}},
    "connect_to_loopback_server": {"process": {"network": REACHED},
                                   "docker": {"network": REACHED}},
    "dns_lookup": {"process": {"network": DNS_REACHED}, "docker": {"network": DNS_REACHED}},
    # process: the uid (0600) and bubblewrap (host paths absent): defence in depth.
    "read_host_secret_files": {"process": {}, "docker": {"files": HOST_VISIBLE}},
    "read_world_readable_host_files": {"process": {"bwrap": READ},
                                       "docker": {"files": HOST_VISIBLE}},
    "read_host_environment": {"process": {"env": ENV_LEAK}, "docker": {"env": ENV_LEAK}},
    "use_docker_socket": {"process": {}, "docker": {"files": HOST_VISIBLE}},
    "write_outside_scratch": {"process": {}, "docker": {"files": HOST_VISIBLE}},
    "write_the_root_filesystem": {"process": {}, "docker": {"files": WROTE}},
    "leave_files_in_tmp_and_shm": {"process": {"bwrap": LEFT_FILES}},
    "fill_the_disk": {"process": {"file-size": DISK_FILLED},
                      "docker": {"file-size": DISK_FILLED}},
    "flood_stdout_and_stderr": {"process": {"file-size": FLOOD_COMPLETE}},
    # docker: /host (files) needs root (user) too, and root needs /host: defence in depth.
    "subprocess_and_os_system": {"process": {}, "docker": {}},
    # process: no compiler in the root (bwrap) and no exec (seccomp): defence in depth.
    "build_native_code": {"process": {}},
    # docker: the filter needs no-new-privileges, so losing either loses it.
    "run_a_written_binary": {"process": {"seccomp": RAN_WRITTEN},
                             "docker": {"seccomp": RAN_WRITTEN, "no-new-privileges": RAN_WRITTEN}},
    "list_what_the_sandbox_sees": {"process": {"runtime": BEYOND, "bwrap": BEYOND},
                                   "docker": {"files": BEYOND}},
    "ctypes_setuid_root": {"process": {"user": SETUID}, "docker": {"user": SETUID}},
    # process: the uid (kill denied) and the PID namespace (not even seen).
    "signal_the_service": {"process": {"bwrap": HOST_PIDS},
                           "docker": {"pid-namespace": HOST_PIDS}},
    "list_host_processes": {"process": {"bwrap": HOST_PIDS},
                            "docker": {"pid-namespace": HOST_PIDS}},
    # process: killed by uid, and with bubblewrap's PID namespace.
    "leave_background_process": {"process": {}},
    "hold_capabilities": {"process": {"user": CAPS}, "docker": {"capabilities": CAPS}},
    # process: set by the backend and by bubblewrap itself.
    "gain_privileges_on_exec": {"process": {},
                                "docker": {"no-new-privileges": NNP}},
    "open_many_files": {"process": {"open-files": FILES_OPENED},
                        "docker": {"open-files": FILES_OPENED}},
    "dump_core": {"process": {"core": CORE}, "docker": {"core": CORE}},
    "spend_cpu_unbounded": {"process": {"cpu": NO_CPU_BOUND}, "docker": {"cpu": NO_CPU_BOUND}},
    "reach_host_ipc": {"process": {"bwrap": SHARED_IPC}, "docker": {"ipc": SHARED_IPC}},
}

# The attacks that also run in a pre-warmed sandbox (prewarm=1), with the same names. A
# process sandbox is warm only with the per-job uid, so "user" is not sabotaged warm there.
WARM = ("connect_to_loopback_server", "read_host_environment", "fork_bomb",
        "gain_privileges_on_exec", "read_host_secret_files", "hold_capabilities",
        "read_world_readable_host_files", "leave_files_in_tmp_and_shm")


def names(attack: str, backend: str, warm: bool = False) -> dict[str, str]:
    """{property: failure message} of one deny test (empty: not one, or defence in depth)."""
    named = dict(DENY.get(attack, {}).get(backend, {}))
    if warm and backend == "process":
        named.pop("user", None)
    return named


def is_deny(attack: str, backend: str) -> bool:
    return backend in DENY.get(attack, {})


def node_id(attack: str, backend: str, warm: bool = False) -> str:
    return f"{WARM_TEST if warm else ATTACK_TEST}[{attack}-{backend}]"


def deny_tests(backends=("process", "docker")) -> list[tuple[str, str, bool]]:
    """Every deny test as (attack, backend, warm)."""
    out = [(a, b, False) for a in DENY for b in backends if b in DENY[a]]
    out += [(a, b, True) for a in WARM for b in backends if b in DENY[a]]
    return out
