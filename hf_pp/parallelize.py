"""Data parallelism inside each pipeline stage, as ``parallelize_fn`` hooks.

A ``parallelize_fn(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names,
cp_axis_name=None, tp_axis_name=None, ep_axis_name=None)`` is applied to each
stage module after the split and before its ``PipelineStage`` is built
(see :func:`hf_pp.functional.pipeline_model`). Two ways to do data parallelism:

- ``"ddp"`` (PipelineTrainer's default when world size > pp_size): no wrapper;
  the trainer averages each gradient over the DP group once per optimizer step
  (after gradient accumulation), which is DDP's arithmetic with ``no_sync``
  over the accumulation steps. Parameter names stay those of the unsplit model.
- ``"fsdp"``: :func:`fsdp_parallelize_fn`, FSDP2 ``fully_shard`` on every layer
  of the stage and on the stage root; torch's pipeline schedule reduces the
  sharded gradients after the last microbatch of each step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .errors import PipelineConfigError
from .split import PrunedModuleList

__all__ = ["DATA_PARALLEL_MODES", "dp_mesh", "fsdp_parallelize_fn"]

DATA_PARALLEL_MODES = ("ddp", "fsdp")


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


def _layers(part: nn.Module) -> list[nn.Module]:
    """The stage's repeated blocks: the members of its layer containers."""
    found = []
    for module in part.modules():
        if isinstance(module, (nn.ModuleList, PrunedModuleList)):
            found.extend(child for child in module.children() if next(child.parameters(), None) is not None)
    return found


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
        for layer in _layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        return model

    parallelize.reshard_after_forward = reshard_after_forward  # read by the pre-flight checks
    return parallelize
