"""The start-up confinement canary, on both backends, and the worker hook it drives."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox.canary import check_confinement
from sandbox.backends.process import ProcessBackend


def _unconfined_process_backend(monkeypatch) -> ProcessBackend:
    monkeypatch.setenv("SELFPROG_SABOTAGE", "1")
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-canary-test-"))
    os.chmod(workroot, 0o711)
    return ProcessBackend(workroot=workroot / "jobs")


@pytest.mark.parametrize("backend_name", [pytest.param("process"),
                                          pytest.param("docker", marks=pytest.mark.docker)])
def test_canary_reports_a_confining_sandbox(backend_name, request):
    backend = request.getfixturevalue(f"{backend_name}_backend")
    report = check_confinement(backend)
    assert report.ok, report.summary()
    assert set(report.checks) == {"network", "host_file", "memory"}
    assert all(ok for ok, _ in report.checks.values())


@pytest.mark.docker
def test_canary_reports_a_sabotaged_docker_sandbox_as_unconfined(docker_backend, monkeypatch):
    monkeypatch.setenv("SELFPROG_SABOTAGE", "1")
    report = check_confinement(docker_backend)
    assert not report.ok
    for name in ("network", "host_file", "memory"):
        assert not report.checks[name][0], (name, report.checks[name])


@pytest.mark.root("the confined process backend")
def test_worker_refuses_sandbox_jobs_when_the_canary_fails(monkeypatch, tmp_path, cnn_data):
    from pipeline import celery_app, sandbox_task
    from pipeline.settings import Settings
    from tests.support.candidates import cnn_source

    monkeypatch.setenv("SELFPROG_SABOTAGE", "1")
    job = {"job_id": "canary-gated", "kind": "evaluate", "source": cnn_source("", "pass"),
           "model_kind": "cnn", "inputs": {"data": str(cnn_data)},
           "params": {"num_classes": 2, "input_shape": [1, 4, 4]},
           "limits": {"timeout_s": 60, "memory_mb": 1024}}
    try:
        settings = Settings.from_env(env={}, sandbox_backend="process")
        celery_app.configure(settings)
        # The canary itself: a sabotaged process sandbox confines nothing.
        probe = _unconfined_process_backend(monkeypatch)
        report = sandbox_task.confinement_report(probe, settings)   # cached for the worker below
        shutil.rmtree(probe.workroot.parent, ignore_errors=True)
        assert not report.ok and "does NOT confine" in report.summary()
        for name in ("network", "host_file", "memory"):
            assert not report.checks[name][0], (name, report.checks[name])
        result = sandbox_task.run_job.apply(args=(job, str(tmp_path / "out"))).get()
        assert result["status"] == "crashed", result
        assert "does NOT confine" in result["reason"] and "refusing" in result["reason"]
        # Development only: the explicit flag runs it anyway (with a loud warning).
        celery_app.configure(Settings.from_env(env={}, sandbox_backend="process",
                                           allow_unconfined=True))
        result = sandbox_task.run_job.apply(args=(job, str(tmp_path / "out2"))).get()
        assert result["status"] == "ok", result
    finally:
        monkeypatch.delenv("SELFPROG_SABOTAGE")
        celery_app.configure(Settings.from_env())
