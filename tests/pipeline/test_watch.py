"""What a backend watches while a job runs (watch.Watch), against real sandboxes.

Live training losses: harness.fit writes out/progress.jsonl, the backend relays it
(watch.ProgressTail), the worker publishes `lm_step` events, the CLI prints them. The
file is written inside the sandbox, so it is attacked here like every other thing that
crosses back: forged, huge, non-finite, a link. It may only ever produce well-formed
(step, loss) pairs for display, and never change a result.

Cancellation: `cancel` stops the jobs of a run that are already in a sandbox, through a
Redis flag (distributed) or the lineage DB (embedded) that the job's watch reads.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cli import print_progress
from pipeline import cancellation, celery_app, events, runs, sandbox_task, stages
from pipeline.settings import Settings
from pipeline.store import LineageStore
from pipeline.sandbox_task import relay_progress
from sandbox.backends.watch import MAX_PROGRESS_LINE, STOPPED_REASON, ProgressTail, Watch
from sandbox.protocol import PROGRESS_FILE
from tests.support.candidates import TINY, candidate, make_job


def tail_in(tmp_path: Path):
    (tmp_path / "out").mkdir(exist_ok=True)
    seen = []
    return ProgressTail(tmp_path, lambda step, loss: seen.append((step, loss))), seen, \
        tmp_path / "out" / PROGRESS_FILE


def test_relays_the_newest_good_line_of_each_poll(tmp_path):
    tail, seen, path = tail_in(tmp_path)
    tail.poll()                                      # no file yet: nothing, no error
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n')
    tail.poll()
    assert seen == [(2, 2.25)]
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 2.0}\n{"step": 4, "lo')   # a line being written
    tail.poll()
    assert seen[-1] == (3, 2.0)
    with open(path, "a") as f:
        f.write('ss": 1.5}\n')
    tail.poll()
    assert seen[-1] == (4, 1.5)
    tail.poll()                                      # nothing new: nothing relayed
    assert len(seen) == 3


@pytest.mark.parametrize("line", [
    '{"step": 5, "loss": NaN}', '{"step": 5, "loss": Infinity}', '{"step": 5, "loss": 1e999}',
    '{"step": -1, "loss": 1.0}', '{"step": 1.5, "loss": 1.0}', '{"step": true, "loss": 1.0}',
    '{"step": 5, "loss": "1.0"}', '{"step": 5}', '{"step": 5, "loss": 1.0, "score": 0.0}',
    '[5, 1.0]', 'not json', '{"step": 5, "loss": ' + "1" * MAX_PROGRESS_LINE + '}',
    '\xff\xfe', '{"step": 99999999999999999999, "loss": 1.0}',
])
def test_forged_lines_are_dropped(tmp_path, line):
    tail, seen, path = tail_in(tmp_path)
    path.write_bytes(b'{"step": 1, "loss": 3.0}\n' + line.encode("utf-8", "surrogateescape")
                     + b"\n")
    tail.poll()
    assert seen == [(1, 3.0)]                        # the good line before it, nothing else


def test_a_flood_is_read_in_bounded_bites(tmp_path):
    tail, seen, path = tail_in(tmp_path)
    path.write_bytes(b"x" * (10 * 1024 * 1024) + b'\n{"step": 7, "loss": 0.5}\n')
    polls = 0
    while not seen and polls < 1000:
        tail.poll()
        polls += 1
    assert seen == [(7, 0.5)] and polls > 100       # 64 KB a poll, never the whole file
    assert len(tail.partial) <= MAX_PROGRESS_LINE    # no unbounded carry-over


def test_a_link_or_a_fifo_is_not_followed(tmp_path):
    tail, seen, path = tail_in(tmp_path)
    secret = tmp_path / "host-file"
    secret.write_text('{"step": 1, "loss": 1.0}\n')
    os.symlink(secret, path)
    tail.poll()
    os.unlink(path)
    os.mkfifo(path)                                  # would block a reader that opened it
    tail.poll()
    assert seen == []


def test_a_broken_relay_does_not_raise(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / PROGRESS_FILE).write_text('{"step": 1, "loss": 1.0}\n')

    def broken(step, loss):
        raise RuntimeError("redis is away")
    ProgressTail(tmp_path, broken).poll()


def test_worker_relays_lm_step_events_at_a_bounded_rate():
    got = []
    events.subscribe("run-x", lambda e, i: got.append((e, i)))
    try:
        relay = relay_progress({"run_id": "run-x", "iteration": 2, "arm": "lm"})
        relay(10, 1.5)
        relay(11, 1.4)                               # within PROGRESS_RELAY_S: dropped
    finally:
        events.unsubscribe("run-x")
    assert got == [("lm_step", {"iteration": 2, "arm": "lm", "step": 10, "loss": 1.5})]
    assert relay_progress(None) is None


def test_cli_prints_a_step(capsys):
    print_progress("lm_step", {"iteration": 1, "arm": "lm", "step": 40, "loss": 0.712345})
    assert capsys.readouterr().err == "[iteration 1] LM step 40: loss 0.7123\n"


# ----------------------------------------------------------------- through a real sandbox

def test_train_lm_relays_its_losses_up_to_the_last_step(process_backend, data_file, tmp_path):
    seen = []
    job = make_job(TINY, data_file, kind="train_lm")
    job.params["epochs"] = 3
    result = process_backend.execute(job, tmp_path, watch=Watch(on_progress=lambda s, v: seen.append((s, v))))
    assert result.status == "ok", result
    assert seen and seen[-1] == (len(result.losses), result.losses[-1])
    assert all(loss == result.losses[step - 1] for step, loss in seen)


def test_a_candidate_forging_progress_changes_no_result(process_backend, data_file, tmp_path):
    """The candidate owns out/: it links the progress file to a host file and writes
    forged lines. The relay sees nothing it did not accept, the result is the harness's."""
    secret = tmp_path / "host.jsonl"
    secret.write_text('{"step": 1, "loss": 0.0}\n')
    os.chmod(tmp_path, 0o755)
    src = candidate("import os\n", f"""
        os.symlink({str(secret)!r}, "out/{PROGRESS_FILE}")
        """)
    seen = []
    result = process_backend.execute(make_job(src, data_file, kind="train_lm"), tmp_path / "a",
                             watch=Watch(on_progress=lambda s, v: seen.append((s, v))))
    assert result.status == "ok", result                 # training went on without progress
    assert seen == []                                    # the host file was not relayed
    forged = candidate("import os, json\n", f"""
        with open("out/{PROGRESS_FILE}", "w") as f:
            f.write(json.dumps({{"step": 10**6, "loss": -1.0}}) + "\\n" + "x" * 10**6 + "\\n")
        """)
    seen.clear()
    result = process_backend.execute(make_job(forged, data_file, kind="train_lm"), tmp_path / "b",
                             watch=Watch(on_progress=lambda s, v: seen.append((s, v))))
    assert result.status == "ok", result
    # Well-formed forgeries can reach the display (and a flood can hide the real lines
    # from it: bounded reads), never the result: the same losses as an honest run.
    assert all(type(s) is int and type(v) is float for s, v in seen)
    honest = process_backend.execute(make_job(TINY, data_file, kind="train_lm"), tmp_path / "c")
    assert (result.losses, result.score) == (honest.losses, honest.score)


# ----------------------------------------------------------------- cancelling running jobs

def cancel_after(seconds: float):
    import time
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 > seconds


def test_a_cancelled_job_is_stopped_and_leaves_nothing(process_backend, data_file, tmp_path):
    from sandbox.backends.process_tree import processes as _processes
    src = candidate("import time\n", """
        while True:
            time.sleep(0.1)
        """)
    job = make_job(src, data_file, timeout_s=300)
    result = process_backend.execute(job, tmp_path, watch=Watch(cancelled=cancel_after(1.0)))
    assert (result.status, result.reason) == ("crashed", STOPPED_REASON), result
    assert not [pid for pid, uid in _processes() if uid == process_backend.last_run.uid]
    assert not process_backend.last_run.jobdir.exists()


def test_an_unanswerable_cancel_check_keeps_the_job_running(process_backend, data_file, tmp_path):
    def broken():
        raise ConnectionError("redis is away")
    result = process_backend.execute(make_job(TINY, data_file), tmp_path,
                                     watch=Watch(cancelled=broken))
    assert result.status == "ok", result


@pytest.mark.docker
def test_a_cancelled_container_is_stopped_and_removed(data_file, tmp_path):
    from sandbox.backends.docker import DockerBackend, docker_available
    from tests.support.docker import IMAGE
    ok, why = docker_available(IMAGE)
    if not ok:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    b = DockerBackend(image=IMAGE, workroot=tmp_path / "work")
    src = candidate("import time\n", """
        while True:
            time.sleep(0.1)
        """)
    job = make_job(src, data_file, timeout_s=300, memory_mb=2048, pids=256)
    result = b.execute(job, tmp_path / "out", watch=Watch(cancelled=cancel_after(1.0)))
    assert (result.status, result.reason) == ("crashed", STOPPED_REASON), result
    import docker
    with pytest.raises(docker.errors.NotFound):
        b.client.containers.get(b.last_run.container_id)
    assert not list((tmp_path / "work").iterdir())


def test_cancel_reaches_running_jobs_over_redis(redis_url, restore_embedded, tmp_path):
    s = Settings.from_env(env={}, broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/l.db")
    celery_app.configure(s)
    check = cancellation.cancel_check("run-a")
    assert check() is False
    cancellation.announce_cancel(s, "run-a")
    assert cancellation.cancel_check("run-a")() is True
    assert cancellation.cancel_check("run-b")() is False            # only that run's jobs
    import redis
    assert 0 < redis.Redis.from_url(redis_url).ttl(cancellation.cancel_key("run-a")) <= cancellation.CANCEL_TTL_S


def test_cancel_reaches_running_jobs_embedded_through_the_db(tmp_path, restore_embedded):
    from pipeline.settings import preset
    url = f"sqlite:///{tmp_path}/lineage.db"
    s = Settings.from_env(env={}, database_url=url, artifact_dir=str(tmp_path / "a"))
    celery_app.configure(s)
    with LineageStore(url, create=True) as store:
        run_id = store.create_run(config=preset("quick").to_dict(), task="self",
                                  preset="quick", seed=0)
        store.set_run_status(run_id, "running")
    check = cancellation.cancel_check(run_id)
    assert check() is False
    runs.cancel(s, run_id)
    assert cancellation.cancel_check(run_id)() is True


def test_every_job_of_a_run_carries_its_run(tmp_path):
    from sandbox.schema import Job, Limits
    job = Job(job_id="r.lm.i0.c1", kind="evaluate", source="pass\n",
              limits=Limits(timeout_s=10)).validate()
    sig = stages._job_task(job, tmp_path, run_id="r", index=0, arm="lm")
    assert sig.kwargs["run"] == {"run_id": "r", "iteration": 0, "arm": "lm"}
    assert sig.options["queue"] == "sandbox"
    watch = sandbox_task.watch_for(job, sig.kwargs["run"])
    assert watch.on_progress is None                  # losses are relayed for LM training only
    assert sandbox_task.watch_for(job, None) is None
