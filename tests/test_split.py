"""Stage modules keep the unsplit model's FQNs and only their own parameters;
bad stage plans are refused; and, on 2 gloo ranks, split_model_into_stages
gives each rank its stages whose one pipeline step equals the unsplit model."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from helpers.custom_models import CustomModel, custom_model_fqns, residual_mlp, residual_mlp_fqns, token_ce_loss
from helpers.distributed import run_distributed
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import build_pipeline_schedule, split_model_into_stages
from hf_pp.split import PrunedModuleList, copy_stage_module, tied_parameter_groups, validate_stage_fqns

BATCH, SEQ, VOCAB, HIDDEN, LAYERS = 4, 5, 32, 16, 8
# (schedule, stages per rank, stage ids of rank 0 and rank 1): loop style, then the V of ZBV.
SPLIT_CASES = [
    ("1f1b", 1, [[0], [1]]),
    ("interleaved_1f1b", 2, [[0, 2], [1, 3]]),
    ("zbv_zero_bubble", 2, [[0, 3], [1, 2]]),
]


def test_stage_copies_keep_original_fqns_and_only_their_params():
    model = CustomModel(vocab_size=50, hidden_size=16, num_layers=4)
    plan = custom_model_fqns(2, 4)
    validate_stage_fqns(model, plan)
    full = dict(model.named_parameters())
    seen = {}
    for fqns in plan:
        stage = copy_stage_module(model, fqns)
        for name, param in stage.named_parameters():
            assert name not in seen, f"{name} on two stages"
            seen[name] = param
            assert torch.equal(param, full[name]) and param is not full[name]
    assert sorted(seen) == sorted(full)


def test_pruned_layers_index_iterate_and_slice_like_the_original():
    model = CustomModel(vocab_size=50, hidden_size=16, num_layers=4)
    stage = copy_stage_module(model, ["layers.2", "layers.3"])
    assert stage.embedding is None and stage.output_proj is None
    assert isinstance(stage.layers, PrunedModuleList) and len(stage.layers) == 2
    assert stage.layers[2] is list(stage.layers)[0]
    assert [id(m) for m in stage.layers[:4]] == [id(m) for m in stage.layers]
    # The original model is untouched by the copy.
    assert isinstance(model.layers, nn.ModuleList) and len(model.layers) == 4
    assert model.embedding is not None


def test_sequential_root_becomes_a_runnable_pruned_stack():
    model = residual_mlp(width=8, num_blocks=4)
    plan = residual_mlp_fqns(2, 4)
    x = torch.randn(3, 8)
    stages = [copy_stage_module(model, fqns) for fqns in plan]
    assert torch.allclose(stages[1](stages[0](x)), model(x))


def test_tied_parameter_groups_and_copies_of_each_side():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    assert tied_parameter_groups(model) == [["embed.weight", "head.weight"]]
    plan = [["embed"], ["body", "head"]]
    validate_stage_fqns(model, plan)  # each name on one stage: allowed
    first, last = (copy_stage_module(model, f) for f in plan)
    assert torch.equal(first.embed.weight, last.head.weight)
    assert first.embed.weight is not last.head.weight


@pytest.mark.parametrize(
    "plan,match",
    [
        ([["embedding", "layers.0"], ["layers.1", "output_proj", "layers.9"]], "'layers.9' listed for stage 1 does not exist"),
        ([["embedding", "layers.0"], ["layers.0", "layers.1", "output_proj"]], "would live on stages \\[0, 1\\]"),
        ([["embedding", "layers.0"], ["layers.1"]], "belongs to no stage"),
        ([["embedding", "layers.0", "layers"], ["layers.1", "output_proj"]], "would live on stages"),
        ([["embedding", "layers", "layers.0"], ["output_proj"]], "lies inside it"),
        ([["embedding", "layers"], [], ["output_proj"]], "Stage 1 has no modules"),
    ],
)
def test_bad_stage_plans_are_refused(plan, match):
    model = CustomModel(vocab_size=50, hidden_size=16, num_layers=2)
    with pytest.raises(PipelineConfigError, match=match):
        validate_stage_fqns(model, plan)


def test_unknown_fqn_error_suggests_close_names():
    model = CustomModel(vocab_size=50, hidden_size=16, num_layers=2)
    with pytest.raises(PipelineConfigError, match="Did you mean"):
        validate_stage_fqns(model, [["embedding", "model.layers.0"], ["layers.1", "output_proj"]])


def _split_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    held = {}
    for name, per_rank, stage_ids in SPLIT_CASES:
        torch.manual_seed(0)
        model = CustomModel(VOCAB, HIDDEN, LAYERS)
        full = dict(model.named_parameters())
        plan = custom_model_fqns(world_size * per_rank, LAYERS)
        stages, parts = split_model_into_stages(
            model, mesh, "pp", name, "cpu", module_fqns_per_model_part=plan,
            patch_inner_model=False, patch_causal_lm_model=False,
        )
        assert [s.stage_index for s in stages] == stage_ids[rank], name
        assert all(s.num_stages == len(plan) for s in stages)
        # The unsplit model is left whole.
        assert model.embedding is not None and len(model.layers) == LAYERS and dict(model.named_parameters()) == full
        names = []
        for stage, part in zip(stages, parts):
            fqns = plan[stage.stage_index]
            expected = sorted(n for n in full if any(n == f or n.startswith(f + ".") for f in fqns))
            got = dict(part.named_parameters())
            assert sorted(got) == expected, (name, stage.stage_index)
            for n, p in got.items():  # a copy with the same values, not the model's own tensor
                assert torch.equal(p, full[n]) and p is not full[n], n
            assert (part.embedding is not None) == ("embedding" in fqns)
            assert (part.output_proj is not None) == ("output_proj" in fqns)
            names += sorted(got)
        held[name] = names

        # One step through the split model equals the unsplit model's loss and gradients.
        ref = copy.deepcopy(model)
        ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
        ref_loss.backward()
        schedule = build_pipeline_schedule(None, name, 1, BATCH, stages, token_ce_loss(BATCH * SEQ), False)
        has_first, has_last = any(s.is_first for s in stages), any(s.is_last for s in stages)
        losses = []
        schedule.step(*((x,) if has_first else ()), target=y if has_last else None, losses=losses)
        if has_last:
            assert len(losses) == BATCH
            torch.testing.assert_close(torch.stack(losses).sum(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for part in parts:
            for n, p in part.named_parameters():
                torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {n}: {m}")
    return held


@pytest.mark.slow
def test_split_model_into_stages_on_2_ranks_holds_the_plan_and_matches_unsplit_step():
    per_rank = run_distributed(_split_worker, 2)
    all_names = sorted(n for n, _ in CustomModel(VOCAB, HIDDEN, LAYERS).named_parameters())
    for name, _, _ in SPLIT_CASES:
        rank0, rank1 = per_rank[0][name], per_rank[1][name]
        assert not set(rank0) & set(rank1), name  # no parameter on two ranks
        assert sorted(rank0 + rank1) == all_names, name  # and none left out
        assert "embedding.weight" in rank0
    assert "output_proj.weight" in per_rank[1]["1f1b"] and "output_proj.weight" in per_rank[1]["interleaved_1f1b"]
    assert "output_proj.weight" in per_rank[0]["zbv_zero_bubble"]  # V shape: rank 0 holds the last stage too
