"""Data parallelism inside the stages: a user's parallelize_fn keeps replicas in step, gradients cross the DP
group once per optimizer step (counted), and parallelize_fn mistakes are refused with a clear message."""

import pytest
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from torch.distributed.device_mesh import init_device_mesh

from helpers.distributed import run_distributed
from hf_pp import AutoPipeline, PipelineTrainer, PipelineTrainingArguments
from hf_pp.errors import PipelineConfigError
from hf_pp.losses import causal_lm_loss
from hf_pp.parallelize import check_parallelize_fn_signature, ddp_parallelize_fn, fsdp_parallelize_fn
from test_trainer_parity import COMMON, _assert_same_run
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

GA = COMMON["gradient_accumulation_steps"]


def plain_parallelize_fn(model, world_mesh, moe_mesh=None, *, pp_enabled, dp_axis_names, cp_axis_name=None,
                         tp_axis_name=None, ep_axis_name=None):
    """A user's hook that does nothing for data parallelism: the stages stay whole replicas."""
    return model


def resharding_parallelize_fn(model, world_mesh, moe_mesh=None, **kwargs):
    """A user's own FSDP that reshards after forward (wrong with split-backward schedules)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=world_mesh["dp"], reshard_after_forward=True)
    return model


def test_parallelize_fn_signature_is_checked_naming_what_is_missing():
    for fine in (plain_parallelize_fn, resharding_parallelize_fn, fsdp_parallelize_fn(), ddp_parallelize_fn(), None):
        check_parallelize_fn_signature(fine)

    def no_tp(model, world_mesh, moe_mesh=None, *, pp_enabled, dp_axis_names, cp_axis_name=None):
        return model

    with pytest.raises(PipelineConfigError, match=r"no_tp .* lacks the keywords \['tp_axis_name', 'ep_axis_name'\]"):
        check_parallelize_fn_signature(no_tp)
    with pytest.raises(PipelineConfigError, match=r"does not take 3 positional arguments .*add \*\*kwargs"):
        check_parallelize_fn_signature(lambda model: model)

    def extra_required(model, world_mesh, moe_mesh, config, **kwargs):
        return model

    with pytest.raises(PipelineConfigError, match="has required parameters beyond those"):
        check_parallelize_fn_signature(extra_required)
    with pytest.raises(PipelineConfigError, match="must be a callable"):
        check_parallelize_fn_signature("fsdp")


def _count_dp_collectives(dp_ranks):
    """Wrap all_reduce / reduce_scatter_single to count calls on the DP group that carry gradients."""
    counts = {"all_reduce": 0, "reduce_scatter": 0}
    originals = {"all_reduce": dist.all_reduce, "reduce_scatter_single": dist.reduce_scatter_single}

    def on_dp(group):
        return group is not None and dist.get_process_group_ranks(group) == dp_ranks

    def all_reduce(tensor, *args, group=None, **kwargs):
        if on_dp(group) and tensor.numel() > 64:  # gradients; not the token count or the padding length
            counts["all_reduce"] += 1
        return originals["all_reduce"](tensor, *args, group=group, **kwargs)

    def reduce_scatter_single(*args, group=None, **kwargs):
        if on_dp(group):
            counts["reduce_scatter"] += 1
        return originals["reduce_scatter_single"](*args, group=group, **kwargs)

    dist.all_reduce, dist.reduce_scatter_single = all_reduce, reduce_scatter_single
    return counts, originals


def _dp_worker(rank, world_size, output_dir, runs):
    from torch.distributed.tensor import DTensor

    out = {}
    for name, mode, fn in runs:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **COMMON)
        trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator, parallelize_fn=fn)
        dp_ranks = dist.get_process_group_ranks(trainer._pp.dp_group)
        counts, originals = _count_dp_collectives(dp_ranks)
        try:
            result = trainer.train()
        finally:
            dist.all_reduce, dist.reduce_scatter_single = originals["all_reduce"], originals["reduce_scatter_single"]
        params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in trainer.model.original_named_parameters()}
        fsdp_groups = sum(1 for part in trainer.model.parts for m in part.modules() if hasattr(m, "_get_fsdp_state")
                          and m._get_fsdp_state()._fsdp_param_group is not None)
        out[name] = (trainer.state.log_history, params, (result.global_step, result.training_loss)), counts, fsdp_groups
    # A hook of the wrong signature: refused in the pre-flight, on every rank, before the split.
    try:
        PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator,
                        parallelize_fn=lambda model, mesh: model)
        out["signature"] = "accepted"
    except PipelineConfigError as err:
        out["signature"] = str(err)
    # A user's fully_shard(reshard_after_forward=True) under a split-backward schedule: refused on every rank.
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_schedule="zbv_zero_bubble", **COMMON)
    try:
        PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator,
                        parallelize_fn=resharding_parallelize_fn)
        out["reshard"] = "accepted"
    except PipelineConfigError as err:
        out["reshard"] = str(err)
    # The same two mistakes through AutoPipeline on a (pp, dp) mesh: caught inside pipeline_model.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    for key, schedule, fn in (("ap_signature", "1f1b", lambda model, mesh: model),
                              ("ap_reshard", "zbv_zero_bubble", resharding_parallelize_fn)):
        try:
            AutoPipeline(mesh, pp_schedule=schedule, pp_batch_size=4).build(tiny_llama(), loss_fn=causal_lm_loss,
                                                                              parallelize_fn=fn)
            out[key] = "accepted"
        except PipelineConfigError as err:
            out[key] = str(err)
    return out


@pytest.mark.slow
def test_user_parallelize_fn_keeps_replicas_in_step_and_gradients_cross_dp_once_per_optimizer_step(tmp_path):
    ref_args = {**COMMON, "per_device_train_batch_size": 2 * COMMON["per_device_train_batch_size"]}
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **ref_args),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    result = trainer.train()
    reference = (trainer.state.log_history, dict(trainer.model.named_parameters(remove_duplicate=False)), result)
    runs = [("user fn", "ddp", plain_parallelize_fn), ("ddp", "ddp", None), ("fsdp", "fsdp", None)]
    per_rank = run_distributed(_dp_worker, 4, str(tmp_path / "pp"), runs, timeout_s=600)
    steps = COMMON["max_steps"]
    for rank, out in enumerate(per_rank):
        for name, _, _ in runs:
            got, counts, fsdp_groups = out[name]
            # Without averaging, the two replicas would drift apart silently and differ from Trainer.
            _assert_same_run(reference, got, f"{name} rank {rank}")
            if name == "fsdp":
                # FSDP2: one reduce-scatter per FSDP group (each layer and the stage root) per schedule step,
                # i.e. per gradient-accumulation step, never per microbatch; nothing left for the trainer to average.
                assert fsdp_groups >= 2
                assert counts == {"all_reduce": 0, "reduce_scatter": steps * GA * fsdp_groups}, counts
            else:
                # Whole replicas: one all-reduce (one fp32 bucket) per optimizer step, after accumulation.
                assert counts == {"all_reduce": steps, "reduce_scatter": 0}, counts
        assert out["signature"].startswith("parallelize_fn <lambda> cannot be called"), out["signature"]
        assert out["ap_signature"].startswith("parallelize_fn <lambda> cannot be called"), out["ap_signature"]
        assert "reshard after forward" in out["ap_reshard"], out["ap_reshard"]
        assert "reshard after forward" in out["reshard"] and "zbv" in out["reshard"].lower(), out["reshard"]


def _bucketed_average_worker(rank, world_size):
    import torch

    from hf_pp.parallelize import average_replicated_grads

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(rank * 10 + i))
             for i, (n, p) in enumerate(layers.named_parameters())}
    for name, p in layers.named_parameters():
        # Rank 1 has no gradient for the first weight: it counts as zero, as DDP counts unused parameters.
        p.grad = None if (rank == 1 and name == "0.weight") else grads[name].clone()
    issued = average_replicated_grads([layers], dist.group.WORLD, world_size, bucket_bytes=16 * 16 * 4)
    return issued, grads, {n: p.grad for n, p in layers.named_parameters()}


@pytest.mark.slow
def test_gradients_are_averaged_in_buckets_of_bounded_size():
    import torch

    per_rank = run_distributed(_bucketed_average_worker, 2)
    (issued, grads0, out0), (_, grads1, out1) = per_rank
    assert issued == 4, "a 1 KiB cap cuts the six parameters into four buckets"
    for name in out0:
        other = torch.zeros_like(grads1[name]) if name == "0.weight" else grads1[name]
        torch.testing.assert_close(out0[name], (grads0[name] + other) / 2)
        torch.testing.assert_close(out1[name], out0[name])
