"""Sabotage mode: the deny tests must FAIL when confinement is switched off.

A suite that passes whatever the sandbox does proves nothing. This runs the attack
suite's deny tests (marker `deny`: the in-sandbox runs whose containment comes from
the confinement itself) in a subprocess with SELFPROG_SABOTAGE=1, which makes both
backends run candidates unconfined (sandbox/backends/base.py `sabotage_enabled`), and
asserts that every one of them fails, while the normal-behaviour tests (marker
`sabotage_control`) still pass there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("SELFPROG_SABOTAGE") == "1", reason="already sabotaged")
@pytest.mark.skipif(os.geteuid() != 0, reason="the confined process backend needs root")
def test_sabotage_mode_makes_every_deny_test_fail(tmp_path):
    report = tmp_path / "junit.xml"
    env = {**os.environ, "SELFPROG_SABOTAGE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-m", "deny or sabotage_control", f"--junitxml={report}",
         "tests/attacks/test_attacks.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    deny = {n: o for n, o in outcomes.items() if n.startswith("test_attack_in_the_sandbox")}
    control = {n: o for n, o in outcomes.items() if n.startswith("test_backend_still_serves")}
    assert deny, proc.stdout[-3000:]
    print("sabotage outcomes:", *(f"{n}: {o}" for n, o in sorted(outcomes.items())), sep="\n  ")
    # Skipped only where the backend is unavailable (Docker on a machine without it).
    ran = {n: o for n, o in deny.items() if o != "skipped"}
    assert any(n.endswith("-process]") for n in ran), deny
    if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
        assert all(o != "skipped" for o in deny.values()), deny
    survivors = sorted(n for n, o in ran.items() if o != "failed")
    assert not survivors, f"deny tests that still pass with confinement OFF: {survivors}"
    assert control and all(o in ("passed", "skipped") for o in control.values()), control
    assert any(o == "passed" for o in control.values()), control
