import pytest
import torch
import torch.nn as nn

from custom_models import CustomModel, custom_model_fqns, residual_mlp, residual_mlp_fqns
from hf_pp.errors import PipelineConfigError
from hf_pp.split import PrunedModuleList, copy_stage_module, tied_parameter_groups, validate_stage_fqns


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
