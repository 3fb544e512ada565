"""The harness: the only code that runs inside a sandbox next to a generated source.

    python -I -c HARNESS_COMMAND     (sandbox/protocol.py; cwd: the job directory)

It reads `job.json` and the tensors under `in/`, turns the candidate source into a
module (or, for a job with a declaration, builds the model and optimizer from it and
runs no candidate code at all), and does one of four jobs (the ML is in
sandbox/training.py):

    declare    run a T5 candidate's build_model/train once and return them as data
               (sandbox/schema.py `Declaration`); the self task's training, generation
               and scoring then run on harness code only, from that declaration

    train_lm   build the LM the source defines, train it text-to-text, write its weights
    generate   rebuild that LM, load the weights, sample n refinements of a prompt
    evaluate   "extended few-shot": train the candidate's model briefly and score it
               (loss), or write its predictions for the evaluation inputs (accuracy: the
               labels never enter the sandbox; the backend scores the predictions)

A loss score is computed here, from model outputs on data the candidate cannot change.
Whatever happens, the harness tries to leave a `out/result.json`, sealed for the backend
(sandbox/guards.py); the backend treats a missing one as a crash. Nothing the candidate
prints is ever parsed. Before the candidate's module body runs, `main`
takes the seal key and the guards' snapshot (sandbox/guards.py); it leaves with
`os._exit`, so no atexit handler or thread of the candidate runs after the result.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from sandbox.guards import (CandidateError, Integrity, SetupError, Trusted, take_seal_key,
                            write_result)
from sandbox import seccomp
from sandbox.protocol import (GO_FILE, GO_POLL_S, JOB_FILE, OUT_DIR, PROGRESS_FILE, READY_FILE,
                              SETUP_ERROR_PREFIX, SETUP_EXIT_CODE)
from sandbox.schema import (MAX_REASON_CHARS, PREDICTIONS_FILE, Declaration, Job, Result,
                            SchemaError)
from sandbox.finetune import finetune
from sandbox.lm_schedule import Schedule, copy_metrics
from sandbox.training import (CANDIDATE_FILE, build, build_declared, count_params, declare,
                              declared_dynamics, fingerprint, fit, generate, load_candidate,
                              load_input, load_weights, mean_loss, pick_device, predict,
                              save_predictions, save_weights)


def main(jobdir: str | os.PathLike = ".") -> None:
    root = Path(jobdir)
    started = time.monotonic()
    seal_key = take_seal_key(root)     # first: no candidate code has run yet
    job = Job.from_json((root / JOB_FILE).read_bytes())
    trusted = None
    try:
        trusted = Trusted()
        if job.model_kind == "t5":   # the T5 classes enter the snapshot
            env = dict(os.environ)
            import transformers  # noqa: F401
            import transformers.models.t5.modeling_t5  # noqa: F401
            for name in set(os.environ) - set(env):   # torch's inductor sets a cache dir
                del os.environ[name]
        integrity = Integrity()
        if seccomp.wanted():   # no exec after start: before any candidate code is imported
            try:
                seccomp.install()
            except seccomp.SeccompUnavailable as e:
                raise SetupError(str(e)) from None
        result = run(job, root, trusted, integrity)
    except SetupError as e:
        sys.stderr.write(f"{SETUP_ERROR_PREFIX}{e}\n")
        sys.stderr.flush()
        os._exit(SETUP_EXIT_CODE)
    except MemoryError:
        result = Result.failure(job, "oom", "MemoryError: the candidate ran out of memory")
    except CandidateError as e:
        result = Result.failure(job, "invalid", str(e))
    except BaseException as e:  # the candidate's own exceptions, SystemExit included
        status = "oom" if _is_oom(e) else "invalid"
        result = Result.failure(job, status, _describe(e))
    result.duration_s = round(time.monotonic() - started, 3)
    try:
        result.validate()
    except SchemaError as e:   # e.g. a finite loss above the schema's bound
        result = Result.failure(job, "invalid", f"the result is out of bounds: {e}")
    write_result(root, result, seal_key, trusted)
    # Leave at once: no atexit handler or thread the candidate registered gets to run.
    sys.stdout.flush()
    sys.stderr.flush()
    (trusted.os_exit if trusted else os._exit)(0)


def warm_main(jobdir: str | os.PathLike = ".", model_kind: str = "t5", device: str = "auto",
              ready: str = "-1") -> None:
    """A pre-warmed sandbox (`prewarm`, sandbox/backends/warm.py): pay the imports
    ahead, then wait for the one job this sandbox will ever run, then run it with `main`.

    Started in a job directory that holds no job yet (no job.json, no inputs, no seal
    key): it imports what `main` would (torch, safetensors, torch._dynamo and, for a T5
    job, transformers), initialises CUDA when the job will use it, says it is ready and
    waits for "go". The backend stages the job's files, then says "go".

    `ready` picks the signals. A file descriptor number (process backend): one byte
    written to it for ready; "go" is a line on stdin, EOF means leave. "file" (Docker:
    no fd or open stdin crosses into a container, so the profile stays the cold one):
    out/READY_FILE for ready (removed at "go"); "go" is GO_FILE appearing in the job
    dir, which only the backend can write. Only this trusted code runs before "go";
    `main` then reads the seal key and takes the integrity snapshot before any
    candidate code runs, exactly as in a cold sandbox. Environment variables the
    imports set are removed again, as `main` does.
    """
    env = dict(os.environ)
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401
    import torch.nn.functional  # noqa: F401
    if model_kind == "t5":
        import transformers  # noqa: F401
        import transformers.models.t5.modeling_t5  # noqa: F401
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        try:
            torch.cuda.init()
            torch.empty(1, device="cuda")     # the context, not only the driver
        except Exception:   # the job will meet (and report) the same error itself
            pass
    for name in set(os.environ) - set(env):
        del os.environ[name]
    marker = Path(jobdir) / OUT_DIR / READY_FILE
    if ready == "file":
        marker.touch(mode=0o600)
    elif int(ready) >= 0:
        try:
            os.write(int(ready), b"r")
        finally:
            os.close(int(ready))
    if ready == "file":
        go = Path(jobdir) / GO_FILE
        while not go.exists():
            time.sleep(GO_POLL_S)
        marker.unlink()
        main(jobdir)
        return
    line = b""
    while not line.endswith(b"\n") and len(line) < 16:
        chunk = os.read(0, 1)
        if not chunk:
            os._exit(0)                   # the backend gave this sandbox up
        line += chunk
    if line != b"go\n":
        os._exit(2)
    devnull = os.open(os.devnull, os.O_RDONLY)   # stdin as in a cold sandbox
    os.dup2(devnull, 0)
    os.close(devnull)
    main(jobdir)


def run(job: Job, root: Path, t: "Trusted | None" = None,
        integrity: "Integrity | None" = None) -> Result:
    t = t or Trusted()
    integrity = integrity or Integrity()
    torch = t.torch

    torch.set_num_threads(int(job.params.get("num_threads", 1)))
    torch.manual_seed(int(job.params.get("seed", 0)))
    device = pick_device(job.params.get("device", "auto"))
    if job.declaration is not None:
        # Harness code only: the model and its learning dynamics come from the declaration
        # a `declare` job made of the candidate (no candidate code runs in this process).
        decl = Declaration.from_dict(job.declaration)
        module = None

        def make_model():
            return build_declared(decl, job, device, t)

        def dynamics(model):
            return declared_dynamics(decl, model, job, t)
    else:
        module = load_candidate(job.source)

        def make_model():
            return build(module, job, device, t)

        def dynamics(model):
            return None   # fit asks the candidate's train(model)
    integrity.check()

    if job.kind == "declare":
        # The candidate's build_model and train, as data (sandbox/training.py `declare`);
        # on the CPU: nothing is trained here.
        model = build(module, job, t.torch.device("cpu"), t)
        decl = declare(module, model, job, t)
        n = count_params(model)
        integrity.check()
        return Result(job_id=job.job_id, kind=job.kind, status="ok", param_count=n,
                      declaration=decl.to_dict())

    if job.kind == "train_lm":
        model = make_model()
        data = load_input(root, job, "data", t)
        dyn = dynamics(model)
        schedule = None
        if "heldout" in job.inputs and dyn is not None:
            # train until the LM copies its input (sandbox/lm_schedule.py), judged on a
            # held-out slice of the corpus; only for a declared LM (harness code only)
            heldout = load_input(root, job, "heldout", t)
            schedule = Schedule(job.params, dyn[0], lambda: copy_metrics(model, heldout, device))
        losses = fit(model, module, data, job, device, t, integrity,
                     progress=root / OUT_DIR / PROGRESS_FILE, dynamics=dyn, schedule=schedule)
        n = count_params(model)
        score = mean_loss(losses)
        metrics = schedule.metrics(len(losses)) if schedule is not None else None
        save_weights(model, root / OUT_DIR / "weights.safetensors", t)   # no candidate code after this
        return Result(job_id=job.job_id, kind=job.kind, status="ok", losses=losses,
                      param_count=n, score=score, outputs=["weights.safetensors"],
                      lm_metrics=metrics)

    if job.kind == "generate":
        model = make_model()
        load_weights(model, root / job.inputs["weights"], t)
        losses = []
        if "lineage" in job.inputs:
            # the lineage proposer: a few steps on the run's own improving edits first
            losses = finetune(model, load_input(root, job, "lineage", t),
                              load_input(root, job, "data", t), job, device, t)
        samples = generate(model, job, device)
        integrity.check()
        return Result(job_id=job.job_id, kind=job.kind, status="ok", samples=samples,
                      losses=losses, param_count=count_params(model))

    # evaluate
    model = make_model()
    data = load_input(root, job, "data", t)
    before = fingerprint(model, t)
    losses = fit(model, module, data, job, device, t, integrity, dynamics=dynamics(model))
    if fingerprint(model, t) == before:
        raise CandidateError("training did not change the model's parameters")
    if job.params.get("score", "loss") == "loss":
        score = mean_loss(losses)   # the paper's L_S(c): mean training loss over the few-shot epoch
        integrity.check()
        return Result(job_id=job.job_id, kind=job.kind, status="ok", score=score, losses=losses,
                      param_count=count_params(model))
    # accuracy: the evaluation labels are not in this sandbox; its predictions leave it and
    # the trusted side scores them. `losses` are the candidate's own, for display only.
    pred = predict(model, data["eval_x"], int(job.params["num_classes"]), device, t)
    n = count_params(model)
    save_predictions(pred, root / OUT_DIR / PREDICTIONS_FILE, t)   # no candidate code after this
    integrity.check()
    return Result(job_id=job.job_id, kind=job.kind, status="ok", losses=losses, param_count=n,
                  outputs=[PREDICTIONS_FILE])


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text or type(e).__name__ == "OutOfMemoryError"


def _describe(e: BaseException) -> str:
    """The exception and, where it came from the candidate, the line in its source."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == CANDIDATE_FILE:
            where = f" (candidate line {frame.lineno}, in {frame.name})"
    text = f"{type(e).__name__}: {e}{where}"
    return text[:MAX_REASON_CHARS]


if __name__ == "__main__":  # pragma: no cover - the backends use the -c form above
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
