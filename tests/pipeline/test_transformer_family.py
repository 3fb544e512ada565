"""The transformer random refinement dataset: the paper's ranges and operators, exactly."""
import random

from hypothesis import given, settings, strategies as st

from pipeline.families import get_family
from pipeline.families import transformer as T
from pipeline.families.source import int_literals
from pipeline.settings import RunConfig, preset
from sandbox.policy import check

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _design(seed):
    return T.sample(random.Random(seed), d_model=512, lr=1e-3, batch_size=16)


@given(seeds)
def test_sampled_designs_are_in_the_papers_ranges(seed):
    d = _design(seed)
    for p, (lo, hi) in T.RANGES.items():
        assert lo <= getattr(d, p) <= hi
    assert T.RANGES == {"num_layers": (1, 8), "num_decoder_layers": (1, 8),
                        "d_ff": (64, 4096), "num_heads": (1, 16)}


@given(seeds, seeds)
def test_a_refinement_changes_exactly_one_parameter_within_range(seed, rseed):
    d = _design(seed)
    r = T.refine(d, random.Random(rseed))
    changed = [p for p in T.PARAMS if getattr(d, p) != getattr(r, p)]
    assert len(changed) == 1
    p = changed[0]
    lo, hi = T.RANGES[p]
    assert lo <= getattr(r, p) <= hi
    if p == "d_ff":
        pct = abs(r.d_ff - d.d_ff) / d.d_ff * 100
        # the integer result of a 1%..50% change; rounding moves it by at most 0.5/d_ff
        # (exactly that at a tie such as 1129 * 1.5, hence the float tolerance)
        eps = 1e-9
        assert 1 - 50 / d.d_ff - eps <= pct <= 50 + 50 / d.d_ff + eps
    else:
        assert abs(getattr(r, p) - getattr(d, p)) == 1


@given(seeds, seeds)
def test_sources_and_refinements_parse_pass_the_gate_and_round_trip(seed, rseed):
    d = _design(seed)
    r = T.refine(d, random.Random(rseed))
    for design in (d, r):
        src = T.render(design)
        compile(src, "<rendered>", "exec")
        verdict = check(src)
        assert verdict.ok, verdict
        parsed = T.parse(src)
        assert {k: parsed[k] for k in T.PARAMS} == design.params()
        assert parsed["d_kv"] == design.d_model // design.num_heads


def test_d_ff_moves_cover_both_directions_and_the_whole_percentage_range():
    rng = random.Random(0)
    pcts = set()
    for _ in range(4000):
        d = T.Design(2, 2, 2000, 8)
        r = T.refine(d, rng)
        if r.d_ff != d.d_ff:
            pcts.add(round((r.d_ff - d.d_ff) / d.d_ff * 100))
    assert min(pcts) == -50 and max(pcts) == 50
    assert {-1, 1} <= pcts


def test_edges_stay_in_range():
    rng = random.Random(1)
    low = T.Design(1, 1, 64, 1)
    high = T.Design(8, 8, 4096, 16)
    for _ in range(500):
        for d in (low, high):
            r = T.refine(d, rng)
            assert all(T.RANGES[p][0] <= getattr(r, p) <= T.RANGES[p][1] for p in T.PARAMS)


@settings(max_examples=5, deadline=None)
@given(seeds)
def test_a_rendered_source_builds_a_t5_without_any_download(seed):
    import transformers
    d = T.sample(random.Random(seed), d_model=16, lr=1e-3, batch_size=4)
    ns = {}
    exec(compile(T.render(d), "<ours>", "exec"), ns)   # our own rendered source, in a test
    model = ns["build_model"](64)
    assert isinstance(model, transformers.T5ForConditionalGeneration)
    assert model.config.num_layers == d.num_layers
    assert model.config.num_decoder_layers == d.num_decoder_layers
    assert model.config.d_ff == d.d_ff and model.config.num_heads == d.num_heads
    opt, bs = ns["train"](model)
    assert bs == 4 and opt.param_groups[0]["lr"] == 1e-3


def test_parse_refuses_what_is_not_a_t5_source():
    assert T.parse("x = 1") is None
    assert T.parse("def (") is None


@given(seeds, seeds, st.sampled_from([16, 32, 64, 512]))
def test_every_refinement_changes_exactly_one_integer_literal(seed, rseed, d_model):
    d = T.sample(random.Random(seed), d_model=d_model, lr=1e-3, batch_size=16)
    r = T.refine(d, random.Random(rseed))
    a, b = int_literals(T.render(d)), int_literals(T.render(r))
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b)) == 1, (a, b)
    # and the rest of the text is the same: the literal is the whole edit
    ta, tb = T.render(d).splitlines(), T.render(r).splitlines()
    assert len(ta) == len(tb) and sum(x != y for x, y in zip(ta, tb)) == 1


def test_a_heads_change_edits_one_number_and_d_kv_follows():
    d = T.Design(2, 2, 1024, 8, d_model=512)
    r = T.Design(2, 2, 1024, 9, d_model=512)
    a, b = int_literals(T.render(d)), int_literals(T.render(r))
    assert [(x, y) for x, y in zip(a, b) if x != y] == [("8", "9")]
    assert T.parse(T.render(r))["d_kv"] == 512 // 9
    assert "d_kv=D_MODEL // NUM_HEADS" in T.render(r)


def test_parse_reads_literals_written_into_the_config_call_too():
    # A generated candidate may inline a number instead of naming the constant.
    src = T.render(T.Design(2, 2, 1024, 8, d_model=64)).replace("d_ff=D_FF", "d_ff=333") \
        .replace("d_kv=D_MODEL // NUM_HEADS", "d_kv=16")
    parsed = T.parse(src)
    assert parsed["d_ff"] == 333 and parsed["d_kv"] == 16 and parsed["num_heads"] == 8


@given(st.sampled_from([preset("quick"), preset("paper"), RunConfig(d_model=64, seed_heads=4)]))
def test_the_seed_is_a_member_of_the_sample_space(config):
    fam = get_family("transformer")
    seed = fam.seed_design(config)
    for p, (lo, hi) in T.RANGES.items():
        assert lo <= getattr(seed, p) <= hi
    # same shape as every sampled source: same text around the same number of literals
    sampled = fam.render(fam.sample_design(random.Random(0), config))
    assert len(int_literals(fam.render(seed))) == len(int_literals(sampled))
    src = fam.render(seed)
    assert fam.design_from_params(fam.parse(src), config) == seed
    assert check(src).ok


def test_the_family_is_registered_with_its_model_kind():
    assert get_family("transformer") is T and T.MODEL_KIND == "t5" and T.NAME == "transformer"
