"""Fine-tuning on the run's lineage (sandbox/finetune.py), on a tiny LM: after a few steps
on improving edits that all made one move, the LM puts more of its probability on that
move when asked to refine a source it has never seen."""
import random
from dataclasses import replace

import torch
import transformers
from safetensors.torch import load_file

from pipeline import refinement
from pipeline import tokenizer as tk
from pipeline.catalog import get_task
from pipeline.families import transformer
from pipeline.settings import preset
from sandbox.finetune import finetune
from sandbox.guards import Trusted
from sandbox.schema import Job
from sandbox.training import t5_loss

SELF = get_task("self")


def _encode(tok, pairs, path, weights=None):
    refinement.encode_pairs(tok, pairs, path, weights=weights)
    return load_file(str(path))


def _move_shares(model, tok, parents, tmp_path) -> dict[tuple[str, str], float]:
    """Per move, its share of the probability of the header lines (teacher-forced), on
    average over the parents."""
    moves = [(p, s) for p in transformer.PARAMS for s in "+-"]
    shares = {m: 0.0 for m in moves}
    model.eval()
    for parent in parents:
        # the header alone as the target: the choice of move is what fine-tuning shifts
        data = _encode(tok, [(parent, refinement.move_header(*m)) for m in moves],
                       tmp_path / "moves.safetensors")
        with torch.no_grad():
            logp = []
            for i in range(len(moves)):
                n = int((data["labels"][i] != -100).sum())
                logp.append(-float(t5_loss(model, data, torch.tensor([i]), "cpu", Trusted())) * n)
        probs = torch.tensor(logp).softmax(0)
        for m, p in zip(moves, probs.tolist()):
            shares[m] += p / len(parents)
    return shares


def test_fine_tuning_on_improving_edits_shifts_probability_to_their_move(tmp_path):
    torch.manual_seed(0)
    cfg = preset("quick")
    corpus_pairs = refinement.make_pairs(cfg, SELF, 512, seed=0)
    tok = tk.train_tokenizer([t for p in corpus_pairs for t in p], 512)
    corpus = _encode(tok, corpus_pairs, tmp_path / "corpus.safetensors")
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.get_vocab_size(), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.seed_heads,
        num_heads=cfg.seed_heads, num_layers=2, num_decoder_layers=2, d_ff=cfg.seed_d_ff,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    # first the LM of the paper, briefly: random refinements
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr)
    t = Trusted()
    for _ in range(80):
        loss = t5_loss(model, corpus, torch.randint(512, (16,)), "cpu", t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the lineage: eight edits that raised d_ff and gained, with different advantages
    rng = random.Random(5)
    edits = []
    while len(edits) < 8:
        d = transformer.sample_design(rng, cfg)
        up = replace(d, d_ff=d.d_ff * 2)
        try:
            up = transformer.Design(**up.to_dict())
        except ValueError:
            continue
        edits.append((transformer.render(d), refinement.move_header("d_ff", "+") + transformer.render(up)))
    lineage = _encode(tok, edits, tmp_path / "lineage.safetensors",
                      weights=[0.5 + i / 8 for i in range(8)])
    unseen = [transformer.render(transformer.sample_design(random.Random(100 + i), cfg))
              for i in range(4)]
    before = _move_shares(model, tok, unseen, tmp_path)[("d_ff", "+")]
    job = Job(job_id="r.lineage.i1.generate", kind="generate", source="", model_kind="t5",
              params={"finetune_steps": 40, "finetune_lr": cfg.lineage_lr, "finetune_batch": 16,
                      "finetune_mix": 0.5, "seed": 1})
    losses = finetune(model, lineage, corpus, job, "cpu", t)
    after = _move_shares(model, tok, unseen, tmp_path)[("d_ff", "+")]
    assert len(losses) == 40 and all(x == x for x in losses)
    print(f"p(d_ff +) {before:.3f} -> {after:.3f}")
    # measured: 0.06 -> 0.55 (14 moves; uniform would be 0.07)
    assert after >= 0.35 and after >= 2 * before, (before, after)


def test_without_lineage_weight_or_steps_nothing_is_trained(tmp_path):
    cfg = preset("quick")
    pairs = refinement.make_pairs(cfg, SELF, 8, seed=0)
    tok = tk.train_tokenizer([t for p in pairs for t in p], 256)
    data = _encode(tok, pairs, tmp_path / "p.safetensors", weights=[0.0] * 8)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.get_vocab_size(), d_model=16, d_kv=8, num_heads=2, num_layers=1,
        num_decoder_layers=1, d_ff=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    job = Job(job_id="r.lineage.i1.generate", kind="generate", source="", model_kind="t5",
              params={"finetune_steps": 5, "finetune_lr": 1e-3})
    assert finetune(model, data, data, job, "cpu", Trusted()) == []
