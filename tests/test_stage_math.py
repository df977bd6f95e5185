import itertools

import pytest

from hf_pp.errors import PipelineConfigError
from hf_pp.functional import calculate_virtual_stages, generate_hf_model_fqn_per_model_part, stage_ids_this_rank
from hf_pp.stage_math import layered_model_fqns_per_stage, split_layers_evenly


def test_spec_examples():
    assert stage_ids_this_rank(pp_rank=0, pp_size=4, num_stages=8, style="loop") == (0, 4)
    assert stage_ids_this_rank(pp_rank=0, pp_size=4, num_stages=8, style="v") == (0, 7)
    assert calculate_virtual_stages(32, 4, 4, is_single_stage_schedule=False, round_to_pp_multiple="up") == (8, 2)
    parts = generate_hf_model_fqn_per_model_part(4, 32, include_rotary_emb=False, fqn_prefix="")
    assert parts[0][0] == "embed_tokens" and parts[-1][-2:] == ["norm", "lm_head"]
    assert [len([f for f in p if f.startswith("layers.")]) for p in parts] == [8, 8, 8, 8]


@pytest.mark.parametrize("pp_size,per_rank", list(itertools.product([1, 2, 3, 4, 8], [1, 2, 3])))
def test_loop_style_covers_every_stage_once(pp_size, per_rank):
    num_stages = pp_size * per_rank
    owned = [stage_ids_this_rank(r, pp_size, num_stages, "loop") for r in range(pp_size)]
    assert sorted(s for ids in owned for s in ids) == list(range(num_stages))
    for rank, ids in enumerate(owned):
        assert all(s % pp_size == rank for s in ids) and list(ids) == sorted(ids)


@pytest.mark.parametrize("pp_size", [1, 2, 3, 4, 8])
def test_v_style_pairs_first_and_last(pp_size):
    owned = [stage_ids_this_rank(r, pp_size, 2 * pp_size, "v") for r in range(pp_size)]
    assert sorted(s for ids in owned for s in ids) == list(range(2 * pp_size))
    assert owned[0] == (0, 2 * pp_size - 1)
    assert all(a + b == 2 * pp_size - 1 for a, b in owned)


def test_stage_ids_errors():
    with pytest.raises(PipelineConfigError, match="multiple of pp_size"):
        stage_ids_this_rank(0, 4, 6)
    with pytest.raises(PipelineConfigError, match="exactly 2 stages per rank"):
        stage_ids_this_rank(0, 2, 6, style="v")
    with pytest.raises(PipelineConfigError, match="pp_rank"):
        stage_ids_this_rank(4, 4, 8)


@pytest.mark.parametrize("num_layers,num_stages", list(itertools.product([1, 4, 7, 10, 32, 33], [1, 2, 3, 4, 8])))
def test_split_layers_evenly(num_layers, num_stages):
    if num_layers < num_stages:
        with pytest.raises(PipelineConfigError, match="at least one layer"):
            split_layers_evenly(num_layers, num_stages)
        return
    ranges = split_layers_evenly(num_layers, num_stages)
    assert [i for r in ranges for i in r] == list(range(num_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1
    if num_stages > 2 and num_layers % num_stages:
        # The remainder avoids the end stages while middle stages can take it.
        assert sizes[0] <= sizes[num_stages // 2] and sizes[-1] <= sizes[num_stages // 2]


@pytest.mark.parametrize(
    "num_layers,lps,pp,single,rounding,expected",
    [
        (32, None, 4, True, None, (4, 1)),
        (32, None, 4, False, None, (8, 2)),
        (32, 8, 4, True, None, (4, 1)),
        (32, 4, 4, False, None, (8, 2)),
        (32, 2, 4, False, None, (16, 4)),
        (26, 4, 4, False, "up", (8, 2)),  # ceil(6.5) = 7 -> 8
        (30, 3, 4, False, "down", (8, 2)),  # 10 -> 8
        (30, 3, 4, False, "up", (12, 3)),
        (12, 2, 3, False, None, (6, 2)),
    ],
)
def test_calculate_virtual_stages(num_layers, lps, pp, single, rounding, expected):
    assert calculate_virtual_stages(num_layers, lps, pp, single, rounding) == expected


@pytest.mark.parametrize(
    "args,match",
    [
        ((30, 4, 4, False, None), "round_to_pp_multiple"),  # layers not divisible, no rounding mode
        ((24, 4, 4, False, None), "multiple of pp_size"),  # 6 stages, not a multiple of 4
        ((32, 4, 4, True, None), "one stage per rank"),  # 8 stages on a single-stage schedule
        ((32, 8, 4, False, None), "at least 2 stages per rank"),  # multi-stage schedule, 1 per rank
        ((4, None, 4, False, None), "at least as many layers"),  # 8 stages, 4 layers
        ((32, 4, 4, False, "sideways"), "'up' or 'down'"),
        ((32, 0, 4, False, None), "at least 1"),
    ],
)
def test_calculate_virtual_stages_errors(args, match):
    with pytest.raises(PipelineConfigError, match=match):
        calculate_virtual_stages(*args)


@pytest.mark.parametrize("num_stages,num_layers", [(1, 4), (2, 4), (4, 32), (3, 10), (8, 8)])
def test_hf_fqn_plan_places_embeddings_head_and_rotary(num_stages, num_layers):
    parts = generate_hf_model_fqn_per_model_part(num_stages, num_layers)
    assert len(parts) == num_stages
    assert [p.count("model.embed_tokens") for p in parts] == [1] + [0] * (num_stages - 1)
    assert [p.count("lm_head") for p in parts] == [0] * (num_stages - 1) + [1]
    assert [p.count("model.norm") for p in parts] == [0] * (num_stages - 1) + [1]
    assert all("model.rotary_emb" in p for p in parts)
    layers = [f for p in parts for f in p if ".layers." in f]
    assert layers == [f"model.layers.{i}" for i in range(num_layers)]
    bare = generate_hf_model_fqn_per_model_part(num_stages, num_layers, False, False, False, "")
    assert not any(f in ("embed_tokens", "lm_head", "rotary_emb") for p in bare for f in p)


def test_layered_model_plan_for_custom_names():
    parts = layered_model_fqns_per_stage(3, [f"blocks.{i}" for i in range(5)], first=["tok"], last=["head"], every=["pos"])
    assert parts == [["tok", "blocks.0", "blocks.1", "pos"], ["blocks.2", "blocks.3", "pos"], ["blocks.4", "head", "pos"]]
