"""The harness: the only code that runs inside a sandbox next to a generated source.

    python -I -c "import sys; sys.path.insert(0, 'lib'); from sandbox.harness import main; main('.')"

It reads `job.json` and the tensors under `in/`, turns the candidate source into a
module, and does one of three jobs:

    train_lm   build the LM the source defines, train it text-to-text, write its weights
    generate   rebuild that LM, load the weights, sample n refinements of a prompt
    evaluate   "extended few-shot": train the candidate's model briefly and score it

The score is always computed here, from model outputs on data the candidate cannot
change; the candidate only decides its architecture and learning dynamics (`train()`
returns an optimizer and a batch size, the loop is ours). Whatever happens, the
harness tries to leave a `out/result.json`; the backend treats a missing one as a crash.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

from sandbox.schema import MAX_REASON_CHARS, Job, Result

CANDIDATE_FILE = "<candidate>"


class CandidateError(Exception):
    """The candidate did something wrong: the job ends `invalid` with this reason."""


def main(jobdir: str | os.PathLike = ".") -> None:
    root = Path(jobdir)
    started = time.monotonic()
    job = Job.from_json((root / "job.json").read_bytes())
    try:
        result = run(job, root)
    except MemoryError:
        result = Result.failure(job, "oom", "MemoryError: the candidate ran out of memory")
    except CandidateError as e:
        result = Result.failure(job, "invalid", str(e))
    except BaseException as e:  # the candidate's own exceptions, SystemExit included
        status = "oom" if _is_oom(e) else "invalid"
        result = Result.failure(job, status, _describe(e))
    result.duration_s = round(time.monotonic() - started, 3)
    result.validate()
    # Write to a temporary name, then rename: a half-written result must never be read.
    tmp = root / "out" / ".result.json.tmp"
    tmp.write_text(result.to_json())
    os.replace(tmp, root / "out" / "result.json")
    # Leave at once: no atexit handler or thread the candidate registered gets to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(job: Job, root: Path) -> Result:
    import torch

    torch.set_num_threads(int(job.params.get("num_threads", 1)))
    torch.manual_seed(int(job.params.get("seed", 0)))
    device = _device(job.params.get("device", "auto"))
    module = load_candidate(job.source)

    if job.kind == "train_lm":
        model = build(module, job, device)
        losses = fit(model, module, _load(root, job, "data"), job, device)
        _save_weights(model, root / "out" / "weights.safetensors")
        return Result(job_id=job.job_id, kind=job.kind, status="ok", losses=losses,
                      param_count=count_params(model), score=_mean(losses),
                      outputs=["weights.safetensors"])

    if job.kind == "generate":
        model = build(module, job, device)
        _load_weights(model, root / job.inputs["weights"])
        samples = generate(model, job, device)
        return Result(job_id=job.job_id, kind=job.kind, status="ok", samples=samples,
                      param_count=count_params(model))

    # evaluate
    model = build(module, job, device)
    data = _load(root, job, "data")
    before = _fingerprint(model)
    losses = fit(model, module, data, job, device)
    if _fingerprint(model) == before:
        raise CandidateError("training did not change the model's parameters")
    if job.params.get("score", "loss") == "loss":
        score = _mean(losses)   # the paper's L_S(c): mean training loss over the few-shot epoch
        curve = []
    else:
        score = accuracy(model, data["eval_x"], data["eval_y"], device)
        curve = [score]
    return Result(job_id=job.job_id, kind=job.kind, status="ok", score=score, losses=losses,
                  eval_curve=curve, param_count=count_params(model))


def load_candidate(source: str) -> types.ModuleType:
    """Run the candidate's module body in a fresh namespace (we are inside the sandbox)."""
    module = types.ModuleType("candidate")
    try:
        code = compile(source, CANDIDATE_FILE, "exec")
    except SyntaxError as e:
        raise CandidateError(f"SyntaxError: {e.msg} (line {e.lineno})") from None
    exec(code, module.__dict__)
    for name in ("build_model", "train"):
        if not callable(module.__dict__.get(name)):
            raise CandidateError(f"the source does not define {name}()")
    return module


def build(module: types.ModuleType, job: Job, device):
    import torch

    if job.model_kind == "t5":
        import transformers
        model = module.build_model(int(job.params["vocab_size"]))
        if not isinstance(model, transformers.T5ForConditionalGeneration):
            raise CandidateError(f"build_model() returned {type(model).__name__}, "
                                 "not a T5ForConditionalGeneration")
        if model.config.vocab_size < int(job.params["vocab_size"]):
            raise CandidateError("the model's vocabulary is smaller than the tokenizer's")
    else:
        shape = tuple(job.params["input_shape"])
        model = module.build_model(shape, int(job.params["num_classes"]))
        if not isinstance(model, torch.nn.Module):
            raise CandidateError(f"build_model() returned {type(model).__name__}, not an nn.Module")
    n = count_params(model)
    if n == 0:
        raise CandidateError("the model has no trainable parameters")
    if n > int(job.params.get("max_params", 10**11)):
        raise CandidateError(f"the model has {n} parameters, more than the limit "
                             f"{job.params['max_params']}")
    return model.to(device)


def fit(model, module, data: dict, job: Job, device) -> list[float]:
    """Train for `epochs` over the data with the candidate's optimizer and batch size.

    Returns the loss of every step. The loss is ours (cross-entropy on the model's
    logits), so a candidate cannot report a better number than it earned.
    """
    import torch

    optimizer, batch_size = _learning_dynamics(module, model, job)
    x_key = "input_ids" if job.model_kind == "t5" else "train_x"
    n = data[x_key].shape[0]
    gen = torch.Generator().manual_seed(int(job.params.get("seed", 0)))
    max_steps = int(job.params.get("max_steps", 0))
    amp = device.type == "cuda"
    losses: list[float] = []
    model.train()
    for _ in range(int(job.params.get("epochs", 1))):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if job.model_kind == "t5":
                    loss = t5_loss(model, data, idx, device)
                else:
                    x, y = data["train_x"][idx].to(device), data["train_y"][idx].to(device)
                    logits = model(x)
                    _check_logits(logits, len(idx), int(job.params["num_classes"]))
                    loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise CandidateError(f"the training loss became non-finite at step {len(losses)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if max_steps and len(losses) >= max_steps:
                return losses
    return losses


def t5_loss(model, data: dict, idx, device):
    """Text-to-text cross-entropy, with the decoder fed the shifted labels (teacher forcing)."""
    import torch

    mask = data["attention_mask"][idx]
    width = max(int(mask.sum(1).max()), 1)           # trim the batch's common padding
    labels = data["labels"][idx]
    label_width = max(int((labels != -100).sum(1).max()), 1)
    input_ids = data["input_ids"][idx, :width].to(device)
    mask = mask[:, :width].to(device)
    labels = labels[:, :label_width].to(device)
    start = torch.zeros_like(labels[:, :1])          # T5's decoder start token is pad (0)
    decoder_in = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask,
                   decoder_input_ids=decoder_in).logits
    _check_logits(logits, len(idx), None)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)


def generate(model, job: Job, device) -> list[list[int]]:
    """Sample n refinements of the prompt in one batched call."""
    import torch

    prompt = torch.tensor([job.params["prompt_ids"]], dtype=torch.long, device=device)
    extra = {}
    try:
        # A cache that grows layer by layer: the default one is sized by the encoder's
        # depth and breaks when a self-written LM has more decoder than encoder layers.
        from transformers import DynamicCache, EncoderDecoderCache
        extra["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    except ImportError:
        pass
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt),
            do_sample=True, num_return_sequences=int(job.params["n"]),
            max_new_tokens=int(job.params["max_new_tokens"]),
            temperature=float(job.params.get("temperature", 1.0)),
            top_k=int(job.params.get("top_k", 0)), top_p=float(job.params.get("top_p", 1.0)),
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra,
        )
    samples = []
    for row in out.tolist():
        ids = row[1:] if row and row[0] == 0 else row   # drop the decoder start token
        if 1 in ids:
            ids = ids[:ids.index(1)]                     # cut at end-of-sequence
        samples.append([t for t in ids if t > 1])        # no pad/eos inside a sample
    return samples


def accuracy(model, x, y, device, batch_size: int = 512) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(device))
            _check_logits(logits, min(batch_size, x.shape[0] - start), None)
            correct += int((logits.argmax(1).cpu() == y[start:start + batch_size]).sum())
    return correct / max(1, x.shape[0])


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _learning_dynamics(module, model, job: Job):
    import torch

    got = module.train(model)
    if not (isinstance(got, tuple) and len(got) == 2):
        raise CandidateError("train(model) must return (optimizer, batch_size)")
    optimizer, batch_size = got
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CandidateError(f"train() returned {type(optimizer).__name__}, not a torch optimizer")
    cap = int(job.params.get("max_batch_size", 4096))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= cap:
        raise CandidateError(f"train() returned batch size {batch_size!r}, outside 1..{cap}")
    ours = {id(p) for p in model.parameters()}
    if not any(id(p) in ours for g in optimizer.param_groups for p in g["params"]):
        raise CandidateError("the optimizer does not update the model's parameters")
    return optimizer, batch_size


def _check_logits(logits, batch: int, classes: int | None) -> None:
    import torch

    if not isinstance(logits, torch.Tensor):
        raise CandidateError(f"the model returned {type(logits).__name__}, not a tensor")
    if logits.shape[0] != batch or (classes is not None and tuple(logits.shape) != (batch, classes)):
        want = f"[{batch}, {classes}]" if classes is not None else f"[{batch}, ...]"
        raise CandidateError(f"the model returned shape {list(logits.shape)}, expected {want}")


def _fingerprint(model) -> list[float]:
    import torch
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in model.parameters()]


def _device(name: str):
    import torch
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _load(root: Path, job: Job, name: str) -> dict:
    from safetensors.torch import load_file
    if name not in job.inputs:
        raise RuntimeError(f"the job has no '{name}' input")
    return load_file(str(root / job.inputs[name]))


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_model
    save_model(model.cpu(), str(path))   # handles T5's tied embeddings


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_model
    missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    if unexpected or any("shared" not in m and "embed_tokens" not in m and "lm_head" not in m
                         for m in missing):
        raise CandidateError("the weights do not fit the model this source defines")


def _mean(xs: list[float]) -> float:
    if not xs:
        raise CandidateError("training ran no steps (is the data empty?)")
    m = sum(xs) / len(xs)
    if not math.isfinite(m):
        raise CandidateError("the mean loss is not finite")
    return m


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
