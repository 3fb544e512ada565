"""`selfprog-cli doctor` through click's CliRunner, against what this machine really has."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from pipeline.cli import main

pytestmark = pytest.mark.root("the process sandbox")   # skips without root; fails in CI


def _doctor(tmp_path, *args, **env):
    base = {"SELFPROG_DATABASE_URL": f"sqlite:///{tmp_path / 'lineage.db'}",
            "SELFPROG_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "SELFPROG_BROKER_URL": "", "SELFPROG_SANDBOX_BACKEND": "process",
            "SELFPROG_SANDBOX_GPUS": "", "SELFPROG_DEVICE": "auto",
            "SELFPROG_ALLOW_UNCONFINED": "", "SELFPROG_SABOTAGE": ""}
    result = CliRunner().invoke(main, ["doctor", *args], env={**base, **env},
                                catch_exceptions=False)
    return result


def _checks(result) -> dict:
    data = json.loads(result.output)
    return {c["name"]: c for c in data["checks"]}


def test_doctor_on_a_working_process_setup(tmp_path):
    result = _doctor(tmp_path, "--json")
    checks = _checks(result)
    assert result.exit_code == 0, result.output
    assert set(checks) == {"docker engine", "sandbox image", "redis", "workers", "database", "gpus",
                           "sandbox runtime", "seccomp filter", "sandbox backend", "confinement"}
    assert checks["confinement"]["status"] == "ok", checks["confinement"]
    assert checks["sandbox backend"]["status"] == "ok"
    assert checks["sandbox runtime"]["status"] == "ok", checks["sandbox runtime"]
    assert "sandbox runtime" in checks["sandbox backend"]["detail"]
    assert "process" in checks["sandbox backend"]["detail"]
    assert checks["database"]["status"] == "warn" and "launch" in checks["database"]["fix"]
    assert checks["redis"]["status"] == "ok" and "embedded" in checks["redis"]["detail"]


def test_doctor_fails_and_says_how_to_fix_what_the_setup_needs(tmp_path):
    result = _doctor(tmp_path, "--skip-canary",
                     SELFPROG_BROKER_URL="redis://127.0.0.1:1/0",
                     SELFPROG_SANDBOX_BACKEND="docker",
                     SELFPROG_SANDBOX_IMAGE="selfprog-no-such-image:never",
                     SELFPROG_SANDBOX_GPUS="0")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("FAIL") and "redis" in line for line in lines), result.output
    assert any(line.startswith("FAIL") and "sandbox image" in line for line in lines) or \
        any(line.startswith("FAIL") and "docker engine" in line for line in lines), result.output
    assert any(line.startswith("FAIL") and "gpus" in line for line in lines), result.output
    assert sum("fix:" in line for line in lines) >= 3, result.output


def test_doctor_fails_when_the_canary_escapes(tmp_path):
    result = _doctor(tmp_path, "--json", SELFPROG_SABOTAGE="1")
    checks = _checks(result)
    assert result.exit_code == 1
    assert checks["confinement"]["status"] == "fail"
    assert "does NOT confine" in checks["confinement"]["detail"]
    assert "SELFPROG_ALLOW_UNCONFINED" in checks["confinement"]["fix"]


def test_doctor_warns_about_a_lineage_db_others_can_read(tmp_path):
    db = tmp_path / "lineage.db"
    from pipeline.store import LineageStore
    LineageStore(f"sqlite:///{db}", create=True).close()
    os.chmod(db, 0o644)
    result = _doctor(tmp_path, "--skip-canary")
    assert "chmod 600" in result.output
    os.chmod(db, 0o600)
    result = _doctor(tmp_path, "--json", "--skip-canary")
    assert _checks(result)["database"]["status"] == "ok"


def test_doctor_builds_the_backend_a_worker_builds(tmp_path):
    # One translation from settings to backend arguments: doctor checks the sandbox the
    # workers would run, pre-warmed sandboxes included.
    import shutil

    from pipeline import doctor
    from pipeline.settings import Settings, backend_kwargs

    s = Settings.from_env(env={}, sandbox_backend="process", sandbox_prewarm=1)
    assert backend_kwargs(s)["prewarm"] == 1
    backend, workroot, check = doctor.pick_backend(s)
    try:
        assert check.status == "ok", check
        assert backend.prewarm == 1
    finally:
        if backend is not None:
            backend.close()
        shutil.rmtree(workroot, ignore_errors=True)


@pytest.mark.parametrize("backend,sabotage,status,confinement", [
    ("process", "", "ok", "bubblewrap"),
    ("process-unconfined", "", "warn", "unconfined"),   # asked for by name: runs, warns
    ("process", "bwrap", "fail", "unconfined"),         # not asked for: a failure
])
def test_doctor_says_which_confinement_is_in_force(tmp_path, backend, sabotage, status,
                                                   confinement):
    result = _doctor(tmp_path, "--json", "--skip-canary", SELFPROG_SANDBOX_BACKEND=backend,
                     SELFPROG_SABOTAGE=sabotage)
    check = _checks(result)["sandbox backend"]
    assert check["status"] == status, check
    assert f"confinement: {confinement}" in check["detail"], check
    assert (result.exit_code == 1) == (status == "fail"), result.output
