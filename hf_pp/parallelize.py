"""Data parallelism inside each pipeline stage, as ``parallelize_fn`` hooks.

A ``parallelize_fn(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names,
cp_axis_name=None, tp_axis_name=None, ep_axis_name=None)`` is applied to each
stage module after the split and before its ``PipelineStage`` is built
(see :func:`hf_pp.functional.pipeline_model`). Two ways to do data parallelism:

- ``"ddp"`` (PipelineTrainer's default when world size > pp_size):
  :func:`ddp_parallelize_fn`, no wrapper: every stage is a whole replica and
  :func:`average_replicated_grads` averages its gradients over the DP group
  once per optimizer step (after gradient accumulation), in one bucket per
  dtype: DDP's arithmetic with ``no_sync`` over the accumulation steps.
  Parameter names stay those of the unsplit model.
- ``"fsdp"``: :func:`fsdp_parallelize_fn`, FSDP2 ``fully_shard`` on every layer
  of the stage and on the stage root; torch's pipeline schedule reduces the
  sharded gradients after the last microbatch of each step.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .errors import PipelineConfigError
from .schedules import ScheduleSpec
from .split import stage_layers

__all__ = ["DATA_PARALLEL_MODES", "PARALLELIZE_FN_KEYWORDS", "dp_mesh", "fsdp_parallelize_fn", "ddp_parallelize_fn",
           "check_parallelize_fn_signature", "modules_resharding_after_forward", "check_parts_for_schedule", "replicated_params",
           "average_replicated_grads"]

DATA_PARALLEL_MODES = ("ddp", "fsdp")
# What a parallelize_fn is called with, after (part, world_mesh, moe_mesh).
PARALLELIZE_FN_KEYWORDS = ("pp_enabled", "dp_axis_names", "cp_axis_name", "tp_axis_name", "ep_axis_name")


def dp_mesh(world_mesh: DeviceMesh, dp_axis_names: Sequence[str] | None) -> DeviceMesh | None:
    """The (possibly flattened) data-parallel sub-mesh, or None without data parallelism."""
    if not dp_axis_names:
        return None
    names = tuple(dp_axis_names)
    missing = [n for n in names if n not in (world_mesh.mesh_dim_names or ())]
    if missing:
        raise PipelineConfigError(f"The device mesh has no axes {missing}; its axes are {world_mesh.mesh_dim_names}.")
    sub = world_mesh[names]
    return sub if len(names) == 1 else sub._flatten()


def fsdp_parallelize_fn(
    *, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = False,
) -> Callable:
    """A ``parallelize_fn`` that shards each stage with FSDP2 over the DP axes.

    ``param_dtype=torch.bfloat16`` computes in bf16 with fp32 master weights
    and fp32 gradient reduction. ``reshard_after_forward`` stays False by
    default: under pipelining a stage runs several microbatches' forwards
    before their backwards, and resharding in between gives wrong gradients
    with split-backward (zero-bubble) schedules.

    Example::

        trainer = PipelineTrainer(model=model, args=args, parallelize_fn=fsdp_parallelize_fn())
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def parallelize(model: nn.Module, world_mesh: DeviceMesh, moe_mesh=None, *, pp_enabled: bool = True,
                    dp_axis_names: Sequence[str] | None = None, cp_axis_name=None, tp_axis_name=None,
                    ep_axis_name=None) -> nn.Module:
        mesh = dp_mesh(world_mesh, dp_axis_names)
        if mesh is None:
            return model
        for layer in stage_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        return model

    parallelize.reshard_after_forward = reshard_after_forward  # read by the pre-flight checks
    return parallelize


def ddp_parallelize_fn() -> Callable:
    """A ``parallelize_fn`` for whole-stage replicas (DDP): leaves each stage as it is.

    Replicas need no wrapper: their gradients are averaged over the DP group
    once per optimizer step by :func:`average_replicated_grads`, which the
    pipeline runtime calls for every parameter that is not a DTensor. (torch's
    DDP wrapper would all-reduce after every microbatch's backward.)

    Example::

        trainer = PipelineTrainer(model=model, args=args, parallelize_fn=ddp_parallelize_fn())
    """

    def parallelize(model: nn.Module, world_mesh: DeviceMesh, moe_mesh=None, *, pp_enabled: bool = True,
                    dp_axis_names: Sequence[str] | None = None, cp_axis_name=None, tp_axis_name=None,
                    ep_axis_name=None) -> nn.Module:
        return model

    return parallelize


def replicated_params(parts: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters that are whole copies on every DP replica: all but DTensors.

    DTensor parameters (FSDP shards, tensor-parallel pieces) are reduced by the
    code that made them; everything else must be averaged across replicas, or
    the replicas drift apart silently.

    Example:
        >>> [tuple(p.shape) for p in replicated_params([nn.Linear(3, 2)])]
        [(2, 3), (2,)]
    """
    return [p for part in parts for p in part.parameters() if not isinstance(p, DTensor)]


# Largest gradient bucket all-reduced at once (DDP's default bucket_cap_mb): the flat copy of the gradients that
# the collective needs never exceeds it, however large the stage.
BUCKET_BYTES = 25 * 2**20


def _buckets(params: list[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` of at most ``cap_bytes`` each (a larger parameter is a bucket alone)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def average_replicated_grads(parts: Iterable[nn.Module], dp_group: dist.ProcessGroup, dp_size: int,
                             bucket_bytes: int = BUCKET_BYTES) -> int:
    """Average the gradients of the trainable :func:`replicated_params` over ``dp_group``; returns the collectives issued.

    Gradients are flattened into buckets of one dtype and at most ``bucket_bytes`` (one all-reduce each),
    so a small fp32 model costs a single collective per optimizer step and a large one never holds a
    second copy of all its gradients. A replica where a parameter got no gradient contributes zeros (as
    DDP does for unused parameters); a parameter no replica gave a gradient keeps ``grad = None``, as in
    one process. The bucket layout depends only on the parameters, never on which gradients exist, so
    replicas always agree.
    """
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in replicated_params(parts):
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)  # a gradient has its parameter's dtype
    issued = 0
    for dtype, all_params in by_dtype.items():
        for params in _buckets(all_params, bucket_bytes):
            # One extra slot per parameter counts the replicas that have its gradient.
            flat = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
            present = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=params[0].device)
            bucket = torch.cat([*flat, present])
            del flat
            dist.all_reduce(bucket, group=dp_group)
            issued += 1
            offset = 0
            for p, seen in zip(params, bucket[-len(params):].tolist()):
                mean = bucket[offset:offset + p.numel()].view_as(p).div_(dp_size)
                offset += p.numel()
                if seen == 0:
                    continue
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
    return issued


def check_parallelize_fn_signature(parallelize_fn: Callable | None) -> None:
    """Refuse a ``parallelize_fn`` that cannot be called as ``fn(part, world_mesh, moe_mesh, *, pp_enabled, ...)``.

    Runs before the split (no collective), naming what the function lacks.

    Example:
        >>> check_parallelize_fn_signature(fsdp_parallelize_fn())  # fine
        >>> check_parallelize_fn_signature(lambda model, mesh: model)
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: parallelize_fn <lambda> cannot be called as fn(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names, cp_axis_name, tp_axis_name, ep_axis_name): it does not take 3 positional arguments (part, world_mesh, moe_mesh) and lacks the keywords ['pp_enabled', 'dp_axis_names', 'cp_axis_name', 'tp_axis_name', 'ep_axis_name']. Define it as def fn(model, world_mesh, moe_mesh=None, *, pp_enabled, dp_axis_names, cp_axis_name=None, tp_axis_name=None, ep_axis_name=None) (or add **kwargs).
    """
    if parallelize_fn is None:
        return
    if not callable(parallelize_fn):
        raise PipelineConfigError(f"parallelize_fn must be a callable, got {type(parallelize_fn).__name__}.")
    try:
        signature = inspect.signature(parallelize_fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to inspect
    keywords = {name: None for name in PARALLELIZE_FN_KEYWORDS}
    try:
        signature.bind(None, None, None, **keywords)
        return
    except TypeError:
        pass
    params = signature.parameters.values()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [] if var_kw else [k for k in PARALLELIZE_FN_KEYWORDS if k not in accepted]
    problems = []
    try:
        signature.bind_partial(None, None, None)
    except TypeError:
        problems.append("does not take 3 positional arguments (part, world_mesh, moe_mesh)")
    if missing:
        problems.append(f"lacks the keywords {missing}")
    if not problems:
        problems.append("has required parameters beyond those")
    name = getattr(parallelize_fn, "__name__", type(parallelize_fn).__name__)
    raise PipelineConfigError(
        f"parallelize_fn {name} cannot be called as fn(part, world_mesh, moe_mesh, *, {', '.join(PARALLELIZE_FN_KEYWORDS)}): "
        f"it {' and '.join(problems)}. Define it as def fn(model, world_mesh, moe_mesh=None, *, pp_enabled, "
        "dp_axis_names, cp_axis_name=None, tp_axis_name=None, ep_axis_name=None) (or add **kwargs)."
    )


def modules_resharding_after_forward(parts: Iterable[nn.Module]) -> list[str]:
    """Names of the FSDP2 modules in ``parts`` that reshard their parameters after forward.

    Read from FSDP's own state, so it sees a user's ``fully_shard(...,
    reshard_after_forward=True)`` as well as ours. Under split-backward
    schedules (zero bubble, ZBV, DualPipeV) such modules give wrong gradients.

    Example:
        >>> modules_resharding_after_forward([nn.Linear(2, 2)])
        []
    """
    from torch.distributed.fsdp import FSDPModule

    found = []
    for index, part in enumerate(parts):
        for name, module in part.named_modules():
            if not isinstance(module, FSDPModule):
                continue
            group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
            if group is not None and getattr(group, "post_forward_mesh_info", None) is not None:
                found.append(f"part {index}: {name or '<stage root>'}")
    return found


def check_parts_for_schedule(parts: Sequence[nn.Module], spec: ScheduleSpec) -> None:
    """Refuse stages whose FSDP modules reshard after forward under a split-backward schedule.

    Catches what :func:`check_parallelize_fn` cannot see: a user's own
    ``fully_shard(..., reshard_after_forward=True)``. Runs on every rank right
    after ``parallelize_fn`` (in :func:`hf_pp.functional.pipeline_model`), before the first schedule step.

    Example:
        >>> from hf_pp.schedules import resolve_schedule
        >>> check_parts_for_schedule([nn.Linear(2, 2)], resolve_schedule("zbv_zero_bubble"))  # fine
    """
    if not spec.splits_backward:
        return
    resharding = modules_resharding_after_forward(parts)
    if resharding:
        raise PipelineConfigError(
            f"FSDP modules reshard after forward ({', '.join(resharding[:4])}{', ...' if len(resharding) > 4 else ''}) "
            f"under the split-backward schedule {spec.name}, which gives wrong gradients; call fully_shard(..., "
            "reshard_after_forward=False) in your parallelize_fn, or use a schedule such as 1f1b or interleaved_1f1b."
        )
