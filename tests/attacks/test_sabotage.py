"""Sabotage: each deny test must FAIL when the confinement property it names is off.

A suite that passes whatever the sandbox does proves nothing. For every confinement
property (sandbox/backends/base.py SABOTAGE_PROPERTIES) this runs, in a subprocess with
SELFPROG_SABOTAGE=<that property>, the deny tests that name it (tests/support/sabotage.py:
cold and pre-warmed sandboxes, both backends) plus a sample of two deny tests that do not
(on the cheapest backend the property applies to, rotating over properties so every deny
test is a sample somewhere), and asserts that exactly the named ones fail, each with the
failure message the table gives for that property (a test that fails for another reason
does not count). Deny tests that no single property makes fail (defence in depth) run
once more with SELFPROG_SABOTAGE=1, everything off, where they must fail while the
normal-behaviour controls still pass.

Cost (measured on the 2-core build machine): see SECURITY.md, "Sabotage mode". gVisor is
not sabotaged (its runtime keeps the network off whatever the container asks).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sandbox.backends.base import SABOTAGE_PROPERTIES
from tests.support import sabotage
from tests.support.docker import IMAGE
from tests.support.env import host_c_compilers, require_root

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = 2
pytestmark = pytest.mark.skipif(bool(os.environ.get("SELFPROG_SABOTAGE")),
                                reason="already sabotaged")


def _backends() -> tuple[str, ...]:
    from sandbox.backends.docker import docker_available
    ok, why = docker_available(IMAGE)
    if ok:
        return ("process", "docker")
    if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SELFPROG_REQUIRE_DOCKER=1 but the Docker backend cannot run: {why}")
    return ("process",)


def _usable(attack: str, backend: str) -> bool:
    # test_attacks.py: the Docker socket attack is a deny test only where the socket
    # exists, the compiler attack runs only where this host has a compiler
    if attack == "build_native_code":
        return bool(host_c_compilers())
    return attack != "use_docker_socket" or Path("/var/run/docker.sock").exists()


def run_sabotaged(value: str, tests: list[str], tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Run `tests` (node ids) with SELFPROG_SABOTAGE=value; {test name: (outcome, message)}."""
    report = tmp_path / "junit.xml"
    env = {**os.environ, "SELFPROG_SABOTAGE": value}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--junitxml={report}", *tests],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    print(f"SELFPROG_SABOTAGE={value}: {len(tests)} tests in {time.monotonic() - t0:.0f} s")
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            outcomes[case.get("name")] = ("failed", (bad.get("message") or "") + "\n"
                                          + (bad.text or "")[-1500:])
        elif case.find("skipped") is not None:
            outcomes[case.get("name")] = ("skipped", case.find("skipped").get("message") or "")
        else:
            outcomes[case.get("name")] = ("passed", "")
    return outcomes


def _name(node: str) -> str:
    return node.split("::", 1)[1]


def _sample(prop: str, backends: tuple[str, ...]) -> list[str]:
    """Two cold deny tests that do not name `prop`, on the cheapest backend where the
    property applies (process if it does), chosen by rotation."""
    applies = [b for b in backends
               if any(prop in sabotage.names(a, b) for a in sabotage.DENY)]
    backend = applies[0] if applies else backends[0]
    others = sorted(sabotage.node_id(a, b) for a, b, w in sabotage.deny_tests((backend,))
                    if not w and prop not in sabotage.names(a, b) and sabotage.names(a, b)
                    and _usable(a, b))
    i = sorted(SABOTAGE_PROPERTIES).index(prop) * SAMPLE
    return sorted({others[(i + k) % len(others)] for k in range(SAMPLE)})


@pytest.mark.parametrize("prop", sorted(SABOTAGE_PROPERTIES))
def test_switching_one_property_off_fails_exactly_the_tests_that_name_it(prop, tmp_path):
    require_root("the confined process backend")
    backends = _backends()
    named = {sabotage.node_id(a, b, w): sabotage.names(a, b, w)[prop]
             for a, b, w in sabotage.deny_tests(backends)
             if prop in sabotage.names(a, b, w) and _usable(a, b)}
    if not named:
        pytest.skip(f"no deny test here names {prop!r} (backends: {backends})")
    sample = [n for n in _sample(prop, backends) if n not in named]
    outcomes = run_sabotaged(prop, [*named, *sample], tmp_path)
    print(*(f"  {n}: {outcomes.get(_name(n), ('missing', ''))[0]}" for n in [*named, *sample]),
          sep="\n")
    wrong = []
    for node, why in named.items():
        outcome, message = outcomes.get(_name(node), ("missing", ""))
        if outcome != "failed":
            wrong.append(f"{node} {outcome} with {prop} off (it names {prop})")
        elif why not in message:
            wrong.append(f"{node} failed, but not for want of {prop} ({why!r} not in: "
                         f"{message[:400]!r})")
    for node in sample:
        outcome, message = outcomes.get(_name(node), ("missing", ""))
        if outcome != "passed":
            wrong.append(f"{node} {outcome} with {prop} off, which it does not name: "
                         f"{message[:400]!r}")
    assert not wrong, "\n".join(wrong)


def test_switching_everything_off_fails_the_defence_in_depth_tests(tmp_path):
    """SELFPROG_SABOTAGE=1: the deny tests that no single property makes fail do fail
    with everything off, and the normal-behaviour controls still pass."""
    require_root("the confined process backend")
    backends = _backends()
    deep = [sabotage.node_id(a, b, w) for a, b, w in sabotage.deny_tests(backends)
            if not sabotage.names(a, b, w) and _usable(a, b)
            and not (w and b == "process")]   # a process sandbox is warm only with its uid
    controls = [f"{sabotage.CONTROL_TEST}[{b}]" for b in backends]
    outcomes = run_sabotaged("1", [*deep, *controls], tmp_path)
    assert deep
    survivors = [n for n in deep if outcomes.get(_name(n), ("missing",))[0] != "failed"]
    assert not survivors, f"deny tests that still pass with confinement OFF: {survivors}"
    broken = [n for n in controls if outcomes.get(_name(n), ("missing",))[0] != "passed"]
    assert not broken, f"normal behaviour broken under sabotage: {broken} {outcomes}"


def test_sabotage_names_are_checked():
    """A typo must not sabotage nothing (and so pass every deny test)."""
    from sandbox.backends.base import sabotaged_properties
    env = dict(os.environ)
    try:
        os.environ["SELFPROG_SABOTAGE"] = "network,netwrok"
        with pytest.raises(ValueError, match="netwrok"):
            sabotaged_properties()
        os.environ["SELFPROG_SABOTAGE"] = "1"
        assert sabotaged_properties() == frozenset(SABOTAGE_PROPERTIES)
        os.environ["SELFPROG_SABOTAGE"] = "network, env"
        assert sabotaged_properties() == {"network", "env"}
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_every_property_is_named_by_a_deny_test():
    """Each property the backends can switch off has a deny test that notices."""
    named = {p for a in sabotage.DENY.values() for props in a.values() for p in props}
    assert named == set(SABOTAGE_PROPERTIES), set(SABOTAGE_PROPERTIES) ^ named
