"""Forward-only passes through the pipeline for evaluation and prediction.

``schedule.eval()`` of a training schedule fails for the V-shaped schedules
(ZBV, DualPipeV): their action lists hold split backward passes. Evaluation
therefore never reuses the training schedule. It runs a schedule of forward
actions only, one microbatch after another, stage by stage in ascending stage
order on every rank, lowered to send/recv actions by torch's own runtime. The
same plan works for every stage placement (loop, V or a CSV schedule), since
a stage only ever waits for a lower stage.

The last stage's outputs (logits) stay where they are for ``evaluate()``
(metrics are computed there and only the small results are shared); for
``predict()`` they are sent to every rank of the pipeline, since the
predictions are what it returns.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import (
    _Action, _add_send_recv, _add_unshard_reshard, _ComputationType, _PipelineScheduleRuntime,
)
from torch.distributed.pipelining.stage import _PipelineStageBase

from .errors import PipelineConfigError

__all__ = [
    "forward_only_actions", "forward_only_schedule", "broadcast_last_stage_output", "gather_over_group",
    "pad_over_group",
]


def forward_only_actions(stage_ids_by_rank: Sequence[Sequence[int]], n_microbatches: int) -> dict[int, list[_Action]]:
    """Compute-only plan: every rank runs its stages in ascending order, all microbatches each.

    Example:
        >>> plan = forward_only_actions([(0, 3), (1, 2)], 2)
        >>> [str(a) for a in plan[0]]
        ['0F0', '0F1', '3F0', '3F1']
    """
    return {
        rank: [_Action(stage, _ComputationType.FORWARD, mb) for stage in sorted(ids) for mb in range(n_microbatches)]
        for rank, ids in enumerate(stage_ids_by_rank)
    }


def forward_only_schedule(
    stages: list[_PipelineStageBase],
    stage_ids_by_rank: Sequence[Sequence[int]],
    n_microbatches: int,
    loss_fn: Callable | None,
) -> _PipelineScheduleRuntime:
    """A schedule that only runs forwards (and the loss on the last stage when ``loss_fn`` is given).

    Run it with ``schedule.eval(...)`` under ``torch.no_grad()``.

    Example (every rank of the pipeline group)::

        schedule = forward_only_schedule(stages, [(0, 3), (1, 2)], 4, loss_fn)
        with torch.no_grad():
            logits = schedule.eval(input_ids, target=labels, losses=losses)  # logits on the last stage
    """
    schedule = _PipelineScheduleRuntime(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    order = forward_only_actions(stage_ids_by_rank, n_microbatches)
    # torch's own lowering (_prepare_schedule_with_comms) first checks that every forward has a
    # backward; lower this forward-only plan with the same steps, minus that check.
    mapping = {action.stage_index: rank for rank, actions in order.items() for action in actions}
    schedule.pipeline_order, schedule.stage_index_to_group_rank = order, mapping
    for stage in stages:
        stage.stage_index_to_group_rank = mapping
    schedule.pipeline_order_with_comms = _add_send_recv(
        {rank: _add_unshard_reshard(actions) for rank, actions in order.items()},
        stage_to_rank=lambda s: mapping[s], num_stages=schedule._num_stages,
    )
    return schedule


def broadcast_last_stage_output(output: torch.Tensor | None, src: int, group: dist.ProcessGroup,
                                device: torch.device) -> torch.Tensor:
    """Send the last stage's output tensor (``src``: its global rank) to every rank of ``group``.

    Other ranks pass ``None``; shape and dtype travel first, so they need not know them. An output that is
    not one tensor raises the same error on every rank.
    """
    if dist.get_rank() == src:
        meta = [tuple(output.shape), output.dtype] if torch.is_tensor(output) else [None, type(output).__name__]
    else:
        meta = [None, None]
    dist.broadcast_object_list(meta, src=src, group=group)
    if meta[0] is None:
        raise PipelineConfigError(
            f"The last stage's output for evaluation is a {meta[1]}, not one tensor: under pipelining "
            "preprocess_logits_for_metrics must return a tensor (it runs on the last stage; its result is sent to "
            "every pipeline rank)."
        )
    if dist.get_rank() != src:
        output = torch.empty(meta[0], dtype=meta[1], device=device)
    output = output.contiguous()
    dist.broadcast(output, src=src, group=group)
    return output


def gather_over_group(tensor: torch.Tensor, group: dist.ProcessGroup | None, keep: int | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` on dim 0; keep the first ``keep`` rows.

    Pipeline ranks of one replica hold the same batch, so evaluation gathers over
    the data-parallel group only. ``keep`` drops the samples the data loader
    repeated to even out the last batch (accelerate's remainder).
    """
    if group is None or dist.get_world_size(group) == 1:
        gathered = tensor
    else:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        gathered = torch.cat(parts, dim=0)
    return gathered[:keep] if keep is not None else gathered


def pad_over_group(data, group: dist.ProcessGroup | None, dim: int = 0, pad_index: int = 0, pad_first: bool = False):
    """accelerate's ``pad_across_processes`` over ``group`` only: pad ``dim`` of every tensor in ``data`` (a tensor
    or nested lists, tuples and dicts of them) to the longest on any rank of the group.

    Under pipelining the logits exist on the last stage's ranks alone, so padding them must not wait for the
    other pipeline ranks; the ranks of one replica hold the same batch, so padding labels over the
    data-parallel group gives what padding over the world gives.

    Example (one process, no group: nothing to pad against):
        >>> pad_over_group({"labels": torch.ones(2, 3)}, None, dim=1)["labels"].shape
        torch.Size([2, 3])
    """
    if isinstance(data, (list, tuple)):
        return type(data)(pad_over_group(d, group, dim, pad_index, pad_first) for d in data)
    if isinstance(data, dict):
        return type(data)({k: pad_over_group(v, group, dim, pad_index, pad_first) for k, v in data.items()})
    if group is None or dist.get_world_size(group) == 1 or not -data.dim() <= dim < data.dim():
        return data
    dim = dim % data.dim()
    sizes = [torch.empty(data.dim(), dtype=torch.long, device=data.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor(data.shape, device=data.device), group=group)
    longest = max(int(s[dim]) for s in sizes)
    if longest == data.shape[dim]:
        return data
    shape = list(data.shape)
    shape[dim] = longest
    padded = data.new_full(shape, pad_index)
    span = slice(longest - data.shape[dim], longest) if pad_first else slice(0, data.shape[dim])
    padded[(slice(None),) * dim + (span,)] = data
    return padded
