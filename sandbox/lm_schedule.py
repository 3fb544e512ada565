"""How long the LM trains: until it copies its input, or until its budget is spent.

The paper fixes no training length. A fixed step count does not work at the sizes this
project runs: a small T5 sits on a plateau (template right, numbers random) and leaves
it abruptly somewhere between ~800 and ~1,600 steps, so a schedule sized in advance
either stops on the plateau or decays the learning rate before the model copies
(docs/REPRODUCTION.md has the measurements). So the harness watches a held-out slice of
the refinement corpus while it trains:

    copy_accuracy  teacher-forced argmax accuracy on the target tokens that must be
                   copied from the input (`copy_mask` of pipeline/refinement.py);
    p_intact       the mean over held-out pairs of the probability that a temperature-1
                   sample reproduces *every* such token: the product of their
                   probabilities. It tracks the single-edit rate of sampled refinements;
                   copy_accuracy does not (it is >= 0.997 already for models that edit
                   several numbers at once), so it is the stop criterion.

The learning rate is the declared one times a factor: a linear warm-up, then constant;
once p_intact reaches the criterion, a linear decay to zero over `decay_steps`, then
stop. The wall-clock budget and the step cap stop it earlier if they come first. Runs
only in harness-only sandboxes (the LM is built from a declaration), on harness code.
"""
from __future__ import annotations

import time


def copy_metrics(model, heldout: dict, device, batch_size: int = 64) -> tuple[float, float]:
    """(copy_accuracy, p_intact) of the model on the held-out pairs, teacher-forced."""
    import torch
    was_training = model.training
    model.eval()
    hits = total = 0
    intact = 0.0
    n = heldout["input_ids"].shape[0]
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            ids = heldout["input_ids"][sl].to(device)
            mask = heldout["attention_mask"][sl].to(device)
            labels = heldout["labels"][sl].to(device)
            copy = heldout["copy_mask"][sl].to(device).bool() & (labels != -100)
            decoder_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp(min=0)], 1)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_in).logits
            logp = torch.log_softmax(logits.float(), -1)
            target = labels.clamp(min=0)
            tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            hits += int(((logp.argmax(-1) == target) & copy).sum())
            total += int(copy.sum())
            intact += float(torch.exp((tok_logp * copy).sum(1)).sum())
    model.train(was_training)
    return hits / max(total, 1), intact / max(n, 1)


class Schedule:
    """The learning-rate factor and the stop decision of one LM training.

        schedule = Schedule(params, optimizer, evaluate=lambda: copy_metrics(...))
        for each step:  schedule.before_step(step); ...; if schedule.after_step(step): break
        schedule.metrics()   # what the result reports
    """

    def __init__(self, params: dict, optimizer, evaluate, clock=time.monotonic):
        self.criterion = float(params.get("copy_criterion", 0.8))
        self.warmup = int(params.get("warmup_steps", 100))
        self.decay = int(params.get("decay_steps", 300))
        self.every = max(int(params.get("check_every", 50)), 1)
        self.budget_s = float(params.get("budget_s", 0) or 0)
        self.max_steps = int(params.get("max_steps", 0) or 0)
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.evaluate = evaluate
        self.clock = clock
        self.started = clock()
        self.reached_at: int | None = None   # the step at which p_intact met the criterion
        self.stop = "epochs"
        self.last: tuple[float, float] | None = None
        self.history: list[tuple[int, float, float]] = []

    def factor(self, step: int) -> float:
        """The multiplier of the declared learning rate before optimizer step `step` (1-based)."""
        f = min(1.0, step / self.warmup) if self.warmup else 1.0
        if self.reached_at is not None and self.decay:
            f *= max(0.0, 1.0 - (step - self.reached_at) / self.decay)
        return f

    def before_step(self, step: int) -> None:
        f = self.factor(step)
        for g, lr in zip(self.optimizer.param_groups, self.base):
            g["lr"] = lr * f

    def after_step(self, step: int) -> bool:
        """True when training should stop after `step` steps."""
        if self.reached_at is None and step % self.every == 0:
            self._check(step)
            if self.last[1] >= self.criterion:
                self.reached_at = step
        if self.reached_at is not None and step - self.reached_at >= self.decay:
            self.stop = "criterion"
            return True
        if self.budget_s and self.clock() - self.started >= self.budget_s:
            self.stop = "budget"
            return True
        if self.max_steps and step >= self.max_steps:
            self.stop = "max_steps"
            return True
        return False

    def _check(self, step: int) -> None:
        self.last = self.evaluate()
        self.history.append((step, *self.last))

    def metrics(self, steps: int) -> dict:
        """Measured again at the end (after the decay), for the lineage DB."""
        self._check(steps)
        acc, p = self.last
        return {"copy_accuracy": round(acc, 6), "p_intact": round(p, 6), "stop": self.stop,
                "criterion_step": self.reached_at if self.reached_at is not None else -1}
