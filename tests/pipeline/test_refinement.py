"""Refinement corpus and tokenizer: deterministic, and digits stay single tokens."""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from pipeline import refinement
from pipeline import tokenizer as tk
from pipeline.catalog import get_task
from pipeline.families import get_family
from pipeline.families.source import int_literals
from pipeline.settings import preset
from sandbox.policy import check

T5 = get_task("self")


def test_pairs_are_deterministic_for_a_seed_and_differ_across_seeds():
    cfg = preset("quick")
    a = refinement.make_pairs(cfg, T5, 20, seed=3)
    b = refinement.make_pairs(cfg, T5, 20, seed=3)
    c = refinement.make_pairs(cfg, T5, 20, seed=4)
    assert a == b and a != c
    assert all(src != ref for src, ref in a)


def test_the_tokenizer_splits_numbers_into_digits_and_round_trips():
    cfg = preset("quick")
    pairs = refinement.make_pairs(cfg, T5, 50, seed=0)
    tok = tk.train_tokenizer([t for p in pairs for t in p], 512)
    src = pairs[0][0]
    ids = tk.encode(tok, src)
    assert ids[-1] == tk.EOS
    assert tk.decode(tok, ids) == src
    pieces = [tok.id_to_token(i) for i in tk.encode(tok, "d_ff=1331,")[:-1]]
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == ["1", "3", "3", "1"]


def test_the_tokenizer_is_deterministic(tmp_path):
    cfg = preset("quick")
    texts = [t for p in refinement.make_pairs(cfg, T5, 40, seed=1) for t in p]
    a, b = tk.train_tokenizer(texts, 300), tk.train_tokenizer(list(reversed(texts)), 300)
    assert a.get_vocab() == b.get_vocab()
    tk.save(a, tmp_path / "tok.json")
    assert tk.load(tmp_path / "tok.json").get_vocab() == a.get_vocab()


def test_encoded_pairs_follow_the_data_contract(tmp_path):
    cfg = preset("quick")
    pairs = refinement.make_pairs(cfg, T5, 10, seed=0)
    tok = tk.train_tokenizer([t for p in pairs for t in p], 512)
    refinement.encode_pairs(tok, pairs, tmp_path / "d.safetensors")
    d = load_file(str(tmp_path / "d.safetensors"))
    assert d["input_ids"].dtype == torch.long and d["input_ids"].shape[0] == 10
    assert (d["attention_mask"].sum(1) == torch.tensor([len(tk.encode(tok, s)) for s, _ in pairs])).all()
    first = d["labels"][0][d["labels"][0] != -100].tolist()
    assert tk.decode(tok, first) == pairs[0][1]
    assert d["copy_mask"].shape == d["labels"].shape


@pytest.mark.parametrize("task", ["self", "digits"])
def test_the_copy_mask_marks_every_target_token_but_the_header_and_the_edit(tmp_path, task):
    spec = get_task(task)
    cfg = preset("quick", task=task)
    pairs = refinement.make_pairs(cfg, spec, 30, seed=5)
    tok = tk.train_tokenizer([t for p in pairs for t in p], 512)
    refinement.encode_pairs(tok, pairs, tmp_path / "d.safetensors")
    d = load_file(str(tmp_path / "d.safetensors"))
    for i, (src, target) in enumerate(pairs):
        labels = d["labels"][i][d["labels"][i] != -100].tolist()
        copy = d["copy_mask"][i][:len(labels)].tolist()
        head = tok.encode(target.split("\n", 1)[0] + "\n", add_special_tokens=False).ids
        assert labels[:len(head)] == head and not any(copy[:len(head)])
        # what is not copied after the header is the edited number: a few digit tokens
        edited = [t for t, c in zip(labels[len(head):], copy[len(head):]) if not c]
        assert 1 <= len(edited) <= 4
        assert all(tok.id_to_token(t).isdigit() for t in edited), [tok.id_to_token(t) for t in edited]
        # and the copied tokens are exactly the source's, before and after the edit
        body = labels[len(head):]
        kept = [t for t, c in zip(body, copy[len(head):]) if c]
        assert len(kept) == len(body) - len(edited)
        assert kept[-1] == tk.EOS and tk.encode(tok, src)[-1] == tk.EOS


def test_the_header_names_the_move_and_is_stripped_from_a_sample():
    cfg = preset("quick")
    family = get_family("transformer")
    for src, target in refinement.make_pairs(cfg, T5, 40, seed=2):
        head, body = target.split("\n", 1)
        name, sign = head.removeprefix(refinement.HEADER).split()
        a, b = refinement.parse(src, T5), refinement.parse(body, T5)
        assert [p for p in family.PARAMS if a[p] != b[p]] == [name]
        assert (b[name] > a[name]) == (sign == "+")
        assert refinement.strip_header(target) == body
    assert refinement.strip_header("import torch\n") == "import torch\n"   # no header: as is
    assert refinement.strip_header("# refine: d_ff +") == ""


def test_random_refinement_of_a_parsed_source_changes_one_parameter():
    cfg = preset("quick")
    seed_src = refinement.render(refinement.seed_design(cfg, T5), T5)
    design = refinement.design_from_params(refinement.parse(seed_src, T5), cfg, T5)
    out = refinement.render(refinement.refine(design, random.Random(0), T5), T5)
    a, b = refinement.parse(seed_src, T5), refinement.parse(out, T5)
    assert sum(a[k] != b[k] for k in ("num_layers", "num_decoder_layers", "d_ff", "num_heads")) == 1


@settings(max_examples=20, deadline=None)
@given(task=st.sampled_from(["self", "digits", "mnist1d", "cifar10"]), seed=st.integers(0, 2**31))
def test_every_corpus_pair_differs_in_exactly_one_integer_literal(task, seed):
    spec = get_task(task)
    cfg = preset("quick", task=task)
    seed_literals = int_literals(refinement.render(refinement.seed_design(cfg, spec), spec))
    for src, target in refinement.make_pairs(cfg, spec, 10, seed=seed):
        ref = refinement.strip_header(target)
        assert target.startswith(refinement.HEADER) and target.endswith(ref)
        a, b = int_literals(src), int_literals(ref)
        # every source of a family has the seed's shape: the same literals, in place
        assert len(a) == len(b) == len(seed_literals)
        assert sum(x != y for x, y in zip(a, b)) == 1, (a, b)
        for text in (src, ref):
            assert check(text).ok
            parsed = refinement.parse(text, spec)
            design = refinement.design_from_params(parsed, cfg, spec)
            assert refinement.render(design, spec) == text          # render/parse round trip


@pytest.mark.parametrize("task", ["self", "digits"])
def test_the_seed_source_round_trips_and_passes_the_gate(task):
    spec = get_task(task)
    cfg = preset("quick", task=task)
    seed = refinement.seed_design(cfg, spec)
    src = refinement.render(seed, spec)
    assert check(src).ok
    assert refinement.design_from_params(refinement.parse(src, spec), cfg, spec) == seed
    assert get_family(spec.family).MODEL_KIND == ("t5" if spec.self_programming else "cnn")


def test_int_literals_lists_the_integers_as_written_in_order():
    src = "A = 10\nB = 0.5\nC = f(3, 1e3 if x else 2)  # 99\nD = 'text 5'\n"
    assert int_literals(src) == ["10", "3", "2"]
    assert int_literals("x = (1,\n") is None   # does not tokenize


def test_choose_distinct_prefers_new_networks_then_fills_in_draw_order():
    cnn = get_family("cnn")
    parent = {"hidden_layers": 1, "conv_layers": 0, "channels": 32, "hidden_size": 16}
    wider = {**parent, "hidden_size": 32}
    deeper = {**parent, "hidden_layers": 2}
    no_op = {**parent, "channels": 16}          # channels without convs: the parent's network
    drawn = [parent, wider, wider, None, no_op, deeper, wider]
    # the copy, the repeat and the no-op are passed over; the unparsable sample stays
    assert refinement.choose_distinct(cnn, parent, drawn, 3) == [1, 3, 5]
    # too few distinct ones: the earliest of the rest fill up, and draw order is kept
    assert refinement.choose_distinct(cnn, parent, drawn, 5) == [0, 1, 2, 3, 5]
    assert refinement.choose_distinct(cnn, parent, drawn[:2], 4) == [0, 1]


def test_network_key_ignores_channels_only_without_convs():
    cnn = get_family("cnn")
    a = {"hidden_layers": 1, "conv_layers": 0, "channels": 32, "hidden_size": 16}
    assert refinement.network_key(cnn, a) == refinement.network_key(cnn, {**a, "channels": 64})
    b = {**a, "conv_layers": 1}
    assert refinement.network_key(cnn, b) != refinement.network_key(cnn, {**b, "channels": 64})
    t5 = get_family("transformer")       # no network_key: every parameter counts
    d = t5.seed_design(preset("quick")).params()
    assert refinement.network_key(t5, d) != refinement.network_key(t5, {**d, "d_ff": 1})


def test_the_control_arm_draws_more_and_keeps_distinct_moves(tmp_path):
    from pipeline.jobs import RunContext
    from pipeline.proposers import Request, random_refinement
    from pipeline.settings import Settings

    cnn = get_family("cnn")
    seed = cnn.render(cnn.SEED)     # from the seed only 3 moves exist: deeper, a conv, wider
    for factor in (1, 4):
        cfg = preset("paper-vision-cpu", task="digits", candidates=3, sample_factor=factor)
        ctx = RunContext("r", cfg, Settings.from_env(env={}, artifact_dir=str(tmp_path)))
        drawn = random_refinement.propose(Request(ctx, "random", 0, seed, 3 * factor)).samples
        designs = [cnn.parse(s) for s in drawn]     # as stages.after_generation chooses
        keep = refinement.choose_distinct(cnn, cnn.parse(seed), designs, 3)
        keys = [refinement.network_key(cnn, designs[i]) for i in keep]
        assert len(keys) == 3
        if factor == 4:
            assert len(set(keys)) == 3
            assert refinement.network_key(cnn, cnn.parse(seed)) not in keys
        else:   # every draw is a candidate: seeded draws that repeat a move here
            assert len(set(keys)) < 3
