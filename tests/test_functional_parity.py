"""Every torch schedule, driven through hf_pp.functional.pipeline_model on gloo
ranks, trains two non-HF models exactly like the unsplit model."""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from helpers.custom_models import CustomModel, custom_model_fqns, mse_sum_loss, residual_mlp, residual_mlp_fqns, token_ce_loss
from helpers.distributed import run_distributed
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import pipeline_model

BATCH, SEQ, VOCAB, HIDDEN, LAYERS, STEPS = 8, 6, 32, 16, 8, 3
# (schedule name, stages per rank); "csv" is a hand-written looped schedule.
SCHEDULES = [
    ("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2),
    ("interleaved_zero_bubble", 2), ("zbv_zero_bubble", 2), ("dual_pipe_v", 2), ("csv", 2),
]


def _looped_csv(pp_size: int, n_microbatches: int) -> str:
    """A user-written CSV schedule: all forwards of a rank's first stage, then its second, then backwards."""
    rows = []
    for rank in range(pp_size):
        first, second = rank, rank + pp_size
        cells = [f"{first}F{m}" for m in range(n_microbatches)] + [f"{second}F{m}" for m in range(n_microbatches)]
        cells += [f"{second}B{m}" for m in range(n_microbatches)] + [f"{first}B{m}" for m in range(n_microbatches)]
        rows.append(",".join(cells))
    fd, path = tempfile.mkstemp(suffix=".csv")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def _model_case(kind: str, num_stages: int):
    """(model, plan, inputs, targets, loss_fn for the pipeline, reference loss)."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if kind == "custom":
        model = CustomModel(VOCAB, HIDDEN, LAYERS)
        inputs = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ), generator=g)
        targets = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ), generator=g)
        ref_loss = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
        return model, custom_model_fqns(num_stages, LAYERS), inputs, targets, token_ce_loss(BATCH * SEQ), ref_loss
    model = residual_mlp(HIDDEN, LAYERS)
    inputs = torch.randn(STEPS, BATCH, HIDDEN, generator=g)
    targets = torch.randn(STEPS, BATCH, 1, generator=g)
    return model, residual_mlp_fqns(num_stages, LAYERS), inputs, targets, mse_sum_loss(BATCH), F.mse_loss


def _reference(model, inputs, targets, loss_fn):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in zip(inputs, targets):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), dict(model.named_parameters())


def _parity_worker(rank, world_size, kind):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    checked = []
    for name, per_rank in SCHEDULES:
        model, plan, inputs, targets, pp_loss, ref_loss = _model_case(kind, world_size * per_rank)
        ref_losses, ref_params = _reference(model, inputs, targets, ref_loss)
        csv = _looped_csv(world_size, BATCH) if name == "csv" else None
        schedule, parts, has_first, has_last, stages = pipeline_model(
            model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
            pipeline_parallel_schedule=None if csv else name, pipeline_parallel_schedule_csv=csv,
            microbatch_size=1, local_batch_size=BATCH, device="cpu", loss_fn=pp_loss,
            module_fqns_per_model_part=plan, patch_inner_model=False, patch_causal_lm_model=False,
        )
        assert len(parts) == per_rank
        opt = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=1e-2)
        for step, (x, y) in enumerate(zip(inputs, targets)):
            opt.zero_grad()
            losses = []
            args = (x,) if has_first else ()
            schedule.step(*args, target=y if has_last else None, losses=losses)
            opt.step()
            if has_last:
                torch.testing.assert_close(torch.stack(losses).sum(), ref_losses[step], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{name} step {step} loss: {m}")
        for part in parts:
            for fqn, param in part.named_parameters():
                torch.testing.assert_close(param, ref_params[fqn], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} param {fqn}: {m}")
        checked.append(name)
    return checked


def _errors_worker(rank, world_size):
    """Bad configurations raise the same PipelineConfigError on every rank, with no collective run."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    model = CustomModel(VOCAB, HIDDEN, 4)
    base = dict(pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None, pipeline_parallel_schedule="1f1b",
                pipeline_parallel_schedule_csv=None, microbatch_size=1, local_batch_size=8, device="cpu",
                loss_fn=token_ce_loss(1), module_fqns_per_model_part=custom_model_fqns(world_size, 4),
                patch_inner_model=False, patch_causal_lm_model=False)
    cases = {
        "batch": dict(local_batch_size=7, microbatch_size=2),
        "too_few_microbatches": dict(local_batch_size=1),
        "schedule": dict(pipeline_parallel_schedule="nonsense"),
        "stages_per_rank": dict(pipeline_parallel_schedule="interleaved_1f1b"),
        "fqn": dict(module_fqns_per_model_part=[["embedding", "layers.0", "layers.1"], ["layers.2", "layers.3", "head"]]),
        "pp_axis": dict(pp_axis_name="pipeline"),
    }
    messages = {}
    for case, override in cases.items():
        try:
            pipeline_model(model, mesh, None, **{**base, **override})
        except PipelineConfigError as err:
            messages[case] = str(err)
    return messages


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["custom", "residual_mlp"])
def test_every_schedule_matches_unsplit_training(world_size, kind):
    checked = run_distributed(_parity_worker, world_size, kind)
    assert all(c == [name for name, _ in SCHEDULES] for c in checked)


@pytest.mark.slow
def test_bad_configuration_fails_identically_on_every_rank():
    per_rank = run_distributed(_errors_worker, 2)
    assert per_rank[0] == per_rank[1]
    messages = per_rank[0]
    assert set(messages) == {"batch", "too_few_microbatches", "schedule", "stages_per_rank", "fqn", "pp_axis"}
    assert "divisible by the microbatch size" in messages["batch"]
    assert "at least 2 microbatches" in messages["too_few_microbatches"]
    assert "Unknown pipeline schedule 'nonsense'" in messages["schedule"]
    assert "at least 2 stages per rank" in messages["stages_per_rank"]
    assert "'head' listed for stage 1 does not exist" in messages["fqn"]
    assert "no axis named 'pipeline'" in messages["pp_axis"]
