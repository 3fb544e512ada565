"""The LM trains until it copies its input (sandbox/lm_schedule.py): the schedule's
learning-rate factor and stop rules, the copy metrics, and their place in a result."""
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pipeline import refinement
from pipeline import tokenizer as tk
from pipeline.catalog import get_task
from pipeline.settings import preset
from sandbox.lm_schedule import Schedule, copy_metrics
from sandbox.schema import Result, SchemaError


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def schedule(values, **params):
    """A Schedule over a one-parameter optimizer whose held-out check returns `values`
    one after the other (p_intact; copy accuracy fixed)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    seen = iter(values)
    clock = Clock()
    s = Schedule({"warmup_steps": 10, "decay_steps": 20, "check_every": 5, **params}, opt,
                 lambda: (0.99, next(seen)), clock=clock)
    return s, opt, clock


def run(s, opt, clock=None, seconds_per_step=0.0, limit=10_000):
    lrs = []
    for step in range(1, limit):
        s.before_step(step)
        lrs.append(opt.param_groups[0]["lr"])
        if clock is not None:
            clock.now += seconds_per_step
        if s.after_step(step):
            return step, lrs
    raise AssertionError("never stopped")


def test_warm_up_then_constant_then_decay_to_zero_after_the_criterion():
    # p_intact is checked every 5 steps: 0.1 at 5, ..., 0.85 at step 20 meets 0.8
    s, opt, _ = schedule([0.1, 0.3, 0.6, 0.85, 0.9], copy_criterion=0.8)
    steps, lrs = run(s, opt)
    assert lrs[0] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.5)   # warm-up, 10 steps
    assert lrs[10:20] == [pytest.approx(0.5)] * 10                           # constant
    assert s.reached_at == 20 and steps == 40 and s.stop == "criterion"    # then 20 decay steps
    assert lrs[20] == pytest.approx(0.5 * (1 - 1 / 20))
    assert lrs[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    # measured once more at the end, after the decay
    assert s.metrics(steps) == {"copy_accuracy": 0.99, "p_intact": 0.9, "stop": "criterion",
                                "criterion_step": 20}


def test_the_budget_stops_a_model_that_never_copies():
    s, opt, clock = schedule([0.1] * 1000, copy_criterion=0.8, budget_s=3.0)
    steps, _ = run(s, opt, clock, seconds_per_step=0.25)
    assert steps == 12 and s.stop == "budget" and s.reached_at is None
    assert s.metrics(steps)["criterion_step"] == -1


def test_the_step_cap_stops_it_and_no_criterion_is_never_met_by_a_low_model():
    s, opt, _ = schedule([0.5] * 1000, copy_criterion=0.8, max_steps=77)
    steps, lrs = run(s, opt)
    assert steps == 77 and s.stop == "max_steps"
    assert max(lrs) == pytest.approx(0.5)


def test_lm_metrics_in_a_result_are_validated():
    ok = {"copy_accuracy": 0.99, "p_intact": 0.8, "stop": "budget", "criterion_step": -1}
    r = Result(job_id="r.lm.i0.train", kind="train_lm", status="ok", lm_metrics=dict(ok)).validate()
    assert Result.from_json(r.to_json()).lm_metrics == ok
    for bad in ({**ok, "p_intact": 1.5}, {**ok, "stop": "bored"}, {**ok, "extra": 1},
                {**ok, "criterion_step": True}, {**ok, "copy_accuracy": float("nan")}):
        with pytest.raises(SchemaError):
            Result(job_id="r.lm.i0.train", kind="train_lm", status="ok", lm_metrics=bad).validate()


def _corpus(tmp_path: Path, n: int, seed: int, tok=None):
    cfg = preset("quick")
    pairs = refinement.make_pairs(cfg, get_task("self"), n, seed=seed)
    tok = tok or tk.train_tokenizer([t for p in pairs for t in p], 512)
    path = tmp_path / f"pairs-{seed}.safetensors"
    refinement.encode_pairs(tok, pairs, path)
    return load_file(str(path)), tok


def test_a_tiny_lm_trained_for_seconds_copies_most_of_its_input(tmp_path):
    """150 steps of the quick preset's seed LM (a few seconds on one thread): measured
    copy accuracy 0.86 on held-out pairs (0.03 untrained; p_intact still ~0: the numbers
    are not copied yet, which is why p_intact, not this, is the stop criterion)."""
    torch.manual_seed(0)
    data, tok = _corpus(tmp_path, 512, seed=0)
    heldout, _ = _corpus(tmp_path, 32, seed=99, tok=tok)
    cfg = preset("quick")
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.get_vocab_size(), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.seed_heads,
        num_heads=cfg.seed_heads, num_layers=2, num_decoder_layers=2, d_ff=cfg.seed_d_ff,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    before, _ = copy_metrics(model, heldout, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr)
    s = Schedule({"warmup_steps": 50, "copy_criterion": 0.8, "max_steps": 150}, opt,
                 lambda: copy_metrics(model, heldout, "cpu"))
    g = torch.Generator().manual_seed(0)
    step = 0
    while True:
        idx = torch.randperm(512, generator=g)[:16]
        labels = data["labels"][idx]
        labels = labels[:, :int((labels != -100).sum(1).max())].contiguous()
        width = int(data["attention_mask"][idx].sum(1).max())
        decoder_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp(min=0)], 1)
        loss = model(input_ids=data["input_ids"][idx, :width],
                     attention_mask=data["attention_mask"][idx, :width],
                     decoder_input_ids=decoder_in, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        step += 1
        s.before_step(step)
        opt.step()
        if s.after_step(step):
            break
    m = s.metrics(step)
    assert before < 0.1
    assert m["stop"] == "max_steps" and m["copy_accuracy"] >= 0.75, m
