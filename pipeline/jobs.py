"""A run's files, and the sandbox jobs built from them.

Trusted code prepares everything a sandbox may see as tensors in the run's artifact
directory (the refinement corpus tokenized, the few-shot subset, a vision task's data),
then describes each stage of the loop as a `sandbox.schema.Job`:

    train_lm   the LM that the current source defines, on the refinement corpus
    generate   that LM, asked to refine the current source n times
    evaluate   one candidate (or the current source), scored the same way every time

A vision task's evaluation labels never go into a sandbox: the sandbox sees train_x,
train_y and eval_x, returns predictions, and the trusted side scores them (`Job.labels`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline import refinement
from pipeline import tokenizer as tk
from pipeline.catalog import SELF, TaskSpec, get_task
from pipeline.families import get_family
from pipeline.settings import RunConfig, Settings
from sandbox.schema import Job, Limits


@dataclass
class RunContext:
    run_id: str
    config: RunConfig
    settings: Settings

    @property
    def dir(self) -> Path:
        return self.settings.artifacts / self.run_id

    @cached_property
    def task(self) -> TaskSpec:
        """What the run's sources are for (pipeline/catalog.py)."""
        return get_task(self.config.task)

    @property
    def family(self):
        """The family module of the run's sources (pipeline/families/)."""
        return get_family(self.task.family)

    @cached_property
    def tokenizer(self):
        return tk.load(self.dir / "tokenizer.json")

    # -- the sources ---------------------------------------------------------------
    def seed_source(self) -> str:
        """The source the run starts from: its family's seed design."""
        return self.family.render(self.family.seed_design(self.config))

    def lm_source(self, current: str) -> str:
        """The LM that does the reprogramming: the current source itself when the LM
        programs itself, the seed LM when it programs another network."""
        if self.task.self_programming:
            return current
        return self.lm_family.render(self.lm_family.seed_design(self.config))

    @property
    def lm_family(self):
        """The family of the LM's own sources: the self-programming task's."""
        return get_family(SELF.family)

    # -- preparation (trusted, once per run) -----------------------------------------
    def prepare(self) -> None:
        """Corpus, tokenizer and tensors. Idempotent: a resumed run reuses its files."""
        if (self.dir / "prepared").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        cfg = self.config
        pairs = refinement.make_pairs(cfg, self.task, cfg.dataset_size, seed=cfg.seed)
        texts = [t for p in pairs for t in p] + [self.seed_source(), self.lm_source(self.seed_source())]
        tok = tk.train_tokenizer(texts, cfg.vocab_size)
        tk.save(tok, self.dir / "tokenizer.json")
        refinement.encode_pairs(tok, pairs, self.dir / "corpus.safetensors")
        # the LM's stop criterion is measured on pairs it never trains on
        heldout = refinement.make_pairs(cfg, self.task, cfg.heldout_samples, seed=cfg.seed + 7919)
        refinement.encode_pairs(tok, heldout, self.dir / "heldout.safetensors")
        if self.task.self_programming:
            # "extended few-shot": the first samples of the same corpus
            refinement.encode_pairs(tok, pairs[:cfg.fewshot_samples], self.dir / "fewshot.safetensors")
        else:
            from pipeline.datasets import save
            data = self.task.load(self.settings.data_dir or None, train_samples=cfg.train_samples,
                                  eval_samples=cfg.eval_samples, seed=cfg.seed)
            save(data, self.dir / "task.safetensors")
            self._split_labels()
        (self.dir / "prepared").write_text("ok\n")

    def _split_labels(self) -> None:
        """Move a vision task's evaluation labels out of the file sandboxes see.

        `task.safetensors` keeps train_x, train_y and eval_x (what a candidate is
        trained on and predicts for); eval_y goes to `labels.safetensors`, which only
        the trusted side reads (sandbox/backends/collect.py `score_predictions`). Also
        splits the file of a run prepared before the split existed. Idempotent."""
        from safetensors import safe_open
        from safetensors.torch import save_file
        task, labels = self.dir / "task.safetensors", self.dir / "labels.safetensors"
        with safe_open(str(task), framework="pt") as f:
            if "eval_y" not in f.keys():
                return
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file({"eval_y": tensors.pop("eval_y")}, str(labels), metadata=meta)
        tmp = task.with_name(".task.safetensors.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, task)

    # -- jobs ------------------------------------------------------------------------
    def _job_id(self, arm: str, iteration: int, what: str) -> str:
        return f"{self.run_id}.{arm}.i{iteration}.{what}"

    def _limits(self, timeout_s: float) -> Limits:
        s = self.settings
        return Limits(timeout_s=timeout_s, memory_mb=s.sandbox_memory_mb, cpus=s.sandbox_cpus,
                      pids=s.sandbox_pids, gpus=1 if s.sandbox_gpus else 0)

    def arm_dir(self, arm: str) -> Path:
        """An arm's own files: the paper's arm in the run directory itself (as before
        arms were proposers), every other arm in a directory of its own."""
        return self.dir if arm == "lm" else self.dir / f"arm-{arm}"

    def lm_dir(self, arm: str, iteration: int) -> Path:
        # Programming another network: one LM per arm for the whole run, trained once.
        return self.arm_dir(arm) / (f"lm-i{iteration}" if self.task.self_programming else "lm")

    def lm_weights(self, arm: str, iteration: int) -> Path:
        """The weights the arm's LM samples with. Programming another network, every arm's
        LM is the seed LM trained on the same corpus with the same seed, so an arm whose
        own is not trained yet takes one another arm of the run has trained (embedded,
        arms run one after the other: the run trains it once)."""
        own = self.lm_dir(arm, iteration) / "weights.safetensors"
        if own.exists() or self.task.self_programming:
            return own
        for other in self.config.arms:
            shared = self.lm_dir(other, iteration) / "weights.safetensors"
            if shared.exists():
                return shared
        return own

    def eval_dir(self, job: Job) -> Path:
        """Where an evaluation's outputs (a vision candidate's predictions) land: one
        directory per job, so that concurrent evaluations never share a file."""
        return self.dir / "evaluate" / job.job_id

    def train_job(self, arm: str, iteration: int, current: str) -> Job:
        cfg = self.config
        inputs = {"data": str(self.dir / "corpus.safetensors")}
        heldout = self.dir / "heldout.safetensors"
        if cfg.lm_copy_criterion and heldout.exists():   # (a run prepared before it existed has none)
            inputs["heldout"] = str(heldout)
        return Job(
            job_id=self._job_id(arm, iteration, "train"), kind="train_lm",
            source=self.lm_source(current), model_kind=self.lm_family.MODEL_KIND,
            inputs=inputs,
            params={"vocab_size": self.tokenizer.get_vocab_size(), "epochs": cfg.lm_epochs,
                    "max_steps": cfg.lm_max_steps, "seed": cfg.seed + iteration,
                    "copy_criterion": cfg.lm_copy_criterion, "budget_s": cfg.lm_budget_s,
                    "warmup_steps": cfg.lm_warmup_steps, "decay_steps": cfg.lm_decay_steps,
                    "num_threads": cfg.num_threads, "device": self.settings.device,
                    "max_params": cfg.max_candidate_params},
            limits=self._limits(cfg.train_timeout_s),
        ).validate()

    def generate_job(self, arm: str, iteration: int, current: str, n: int,
                     lineage: Path | None = None) -> Job:
        """The LM of `arm` samples n refinements of `current`. With `lineage` (pairs from
        the run's own edits, pipeline/proposers/lineage.py) it is fine-tuned on them,
        mixed with corpus pairs, before it samples (sandbox/finetune.py)."""
        cfg = self.config
        inputs = {"weights": str(self.lm_weights(arm, iteration))}
        params = {"vocab_size": self.tokenizer.get_vocab_size(), "n": n,
                  "prompt_ids": tk.encode(self.tokenizer, current),
                  "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                  "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed + iteration,
                  "num_threads": cfg.num_threads, "device": self.settings.device,
                  "max_params": cfg.max_candidate_params}
        if lineage is not None:
            inputs.update(lineage=str(lineage), data=str(self.dir / "corpus.safetensors"))
            params.update(finetune_steps=cfg.lineage_steps, finetune_lr=cfg.lineage_lr,
                          finetune_batch=cfg.lineage_batch, finetune_mix=cfg.lineage_mix)
        return Job(
            job_id=self._job_id(arm, iteration, "generate"), kind="generate",
            source=self.lm_source(current), model_kind=self.lm_family.MODEL_KIND,
            inputs=inputs, params=params, limits=self._limits(cfg.train_timeout_s),
        ).validate()

    def evaluate_job(self, arm: str, iteration: int, index: int, source: str) -> Job:
        cfg = self.config
        params = {"seed": cfg.seed, "num_threads": cfg.num_threads, "device": self.settings.device,
                  "score": self.task.score, "max_params": cfg.max_candidate_params}
        if self.task.self_programming:
            # the LM's own source, scored by its few-shot loss on the refinement corpus
            data = self.dir / "fewshot.safetensors"
            params.update(vocab_size=self.tokenizer.get_vocab_size(), epochs=cfg.fewshot_epochs)
            labels = ""
        else:
            # train_x, train_y, eval_x only; eval_y stays on this side (`_split_labels`)
            self._split_labels()
            data = self.dir / "task.safetensors"
            labels = str(self.dir / "labels.safetensors")
            params.update(input_shape=list(self.task.input_shape),
                          num_classes=self.task.num_classes, epochs=cfg.task_epochs)
        return Job(job_id=self._job_id(arm, iteration, f"c{index}"), kind="evaluate",
                   source=source, model_kind=self.family.MODEL_KIND, inputs={"data": str(data)},
                   params=params, limits=self._limits(cfg.eval_timeout_s), labels=labels)

