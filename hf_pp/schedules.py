"""Choosing and building a torch pipeline schedule, with every check that can
be made from the configuration alone (so it runs before any collective)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
)
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.nn.parallel import DistributedDataParallel

from .compile import is_compiled
from .errors import PipelineConfigError

__all__ = [
    "ScheduleSpec",
    "SCHEDULE_NAMES",
    "resolve_schedule",
    "read_csv_schedule_stages",
    "validate_microbatches",
    "build_pipeline_schedule",
    "InputGradsFirstStage",
    "splits_last_backward",
]

# Canonical name -> torch class. Names are matched case-insensitively with
# "_", "-" and spaces ignored, so "interleaved_1f1b" and "Interleaved1F1B" agree.
_SCHEDULE_CLASSES = {
    "GPipe": torch_schedules.ScheduleGPipe,
    "1F1B": torch_schedules.Schedule1F1B,
    "Interleaved1F1B": torch_schedules.ScheduleInterleaved1F1B,
    "LoopedBFS": torch_schedules.ScheduleLoopedBFS,
    "InterleavedZeroBubble": torch_schedules.ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": torch_schedules.ScheduleZBVZeroBubble,
    "DualPipeV": torch_schedules.ScheduleDualPipeV,
}
SCHEDULE_NAMES = tuple(_SCHEDULE_CLASSES)
_ALIASES = {"zbv": "ZBVZeroBubble", "zerobubble": "InterleavedZeroBubble", "zb": "InterleavedZeroBubble"}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_- ")


@dataclass(frozen=True)
class ScheduleSpec:
    """What the rest of hf_pp needs to know about a schedule before building it."""

    name: str  # canonical name, or "csv"
    schedule_class: type[_PipelineSchedule]
    single_stage: bool  # exactly one stage per rank
    style: str  # stage placement: "loop" or "v"
    splits_backward: bool  # separate input- and weight-gradient passes (zero bubble)


def resolve_schedule(name: str | None, csv_path: str | None = None) -> ScheduleSpec:
    """Look a schedule up by name (case-insensitive) or describe a CSV schedule.

    Example:
        >>> resolve_schedule("interleaved_1f1b").schedule_class.__name__
        'ScheduleInterleaved1F1B'
    """
    if csv_path is not None:
        if not os.path.isfile(csv_path):
            raise PipelineConfigError(f"pp schedule CSV file {csv_path!r} does not exist.")
        return ScheduleSpec("csv", _PipelineScheduleRuntime, False, "csv", True)
    if not name:
        raise PipelineConfigError(f"No pipeline schedule given; choose one of {', '.join(SCHEDULE_NAMES)}.")
    key = _normalise(name)
    canonical = _ALIASES.get(key) or next((n for n in SCHEDULE_NAMES if _normalise(n) == key), None)
    if canonical is None:
        raise PipelineConfigError(
            f"Unknown pipeline schedule {name!r}. Valid schedules (case-insensitive): "
            f"{', '.join(SCHEDULE_NAMES)}; or pass a CSV file as the schedule CSV."
        )
    cls = _SCHEDULE_CLASSES[canonical]
    return ScheduleSpec(
        name=canonical,
        schedule_class=cls,
        single_stage=issubclass(cls, PipelineScheduleSingle),
        style="v" if canonical in ("ZBVZeroBubble", "DualPipeV") else "loop",
        splits_backward=canonical in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"),
    )


def read_csv_schedule_stages(csv_path: str, pp_size: int) -> tuple[int, list[tuple[int, ...]]]:
    """``(num_stages, stage ids of each rank)`` as written in a compute-only CSV schedule.

    One row per rank, cells like ``0F1`` (stage 0, forward, microbatch 1).
    """
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f)]
    if len(rows) != pp_size:
        raise PipelineConfigError(f"Schedule CSV {csv_path!r} has {len(rows)} rows but pp_size is {pp_size}: one row per rank.")
    per_rank, owner = [], {}
    for rank, row in enumerate(rows):
        ids = set()
        for cell in row:
            action = torch_schedules._Action.from_str(cell)
            if action is not None and action.stage_index >= 0:
                ids.add(action.stage_index)
                if owner.setdefault(action.stage_index, rank) != rank:
                    raise PipelineConfigError(
                        f"Schedule CSV {csv_path!r} runs stage {action.stage_index} on ranks "
                        f"{owner[action.stage_index]} and {rank}; a stage lives on one rank."
                    )
        per_rank.append(tuple(sorted(ids)))
    num_stages = len(owner)
    if sorted(owner) != list(range(num_stages)):
        raise PipelineConfigError(f"Schedule CSV {csv_path!r} must use stages 0..N-1, got {sorted(owner)}.")
    if len({len(ids) for ids in per_rank}) != 1:
        raise PipelineConfigError(f"Schedule CSV {csv_path!r} gives ranks different numbers of stages: {per_rank}.")
    return num_stages, per_rank


def validate_microbatches(
    spec: ScheduleSpec, local_batch_size: int, microbatch_size: int, pp_size: int, stages_per_rank: int
) -> int:
    """Check the batch can feed the schedule; return the number of microbatches."""
    if microbatch_size < 1 or local_batch_size < 1:
        raise PipelineConfigError(
            f"Batch and microbatch sizes must be positive, got local batch {local_batch_size} and microbatch "
            f"{microbatch_size}."
        )
    if local_batch_size % microbatch_size != 0:
        raise PipelineConfigError(
            f"The local batch size ({local_batch_size}) must be divisible by the microbatch size "
            f"({microbatch_size}); change one of them (e.g. microbatch size 1)."
        )
    n_microbatches = local_batch_size // microbatch_size
    num_stages = pp_size * stages_per_rank
    needed = {"1F1B": pp_size, "DualPipeV": num_stages}.get(spec.name, 1)
    if spec.name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds != 0:
            raise PipelineConfigError(
                f"{spec.name} needs the number of microbatches ({n_microbatches}) to be a multiple of "
                f"{rounds} (microbatches // pp_size); use a multiple of pp_size={pp_size} or fewer than it."
            )
    if n_microbatches < needed:
        raise PipelineConfigError(
            f"{spec.name} with {num_stages} stages needs at least {needed} microbatches, but local batch "
            f"{local_batch_size} / microbatch {microbatch_size} gives {n_microbatches}. Raise the batch size "
            "or lower the microbatch size."
        )
    return n_microbatches


def build_pipeline_schedule(
    pipeline_parallel_schedule_csv: str | None,
    pipeline_parallel_schedule: str | None,
    microbatch_size: int,
    local_batch_size: int,
    stages: list[_PipelineStageBase],
    loss_fn: Callable | None,
    scale_grads: bool = False,
) -> _PipelineSchedule:
    """Build a torch schedule for this rank's ``stages``.

    ``local_batch_size / microbatch_size`` microbatches go through the
    pipeline per ``step``. With ``scale_grads=True`` torch divides gradients by
    the number of microbatches (pair it with a mean loss); keep it False when
    the loss is already normalised for the whole batch.

    Example (run on every rank of the pipeline group)::

        schedule = build_pipeline_schedule(None, "1f1b", 1, 8, [stage], loss_fn)
        losses = []
        schedule.step(input_ids, target=labels, losses=losses)
    """
    if not stages:
        raise PipelineConfigError("build_pipeline_schedule needs at least one stage on this rank.")
    spec = resolve_schedule(pipeline_parallel_schedule, pipeline_parallel_schedule_csv)
    pp_size = stages[0].group_size
    if spec.single_stage and len(stages) != 1:
        raise PipelineConfigError(
            f"{spec.name} runs exactly one stage per rank but this rank has {len(stages)}; use a multi-stage "
            "schedule such as interleaved_1f1b."
        )
    if not spec.single_stage and spec.name != "csv" and len(stages) < 2:
        raise PipelineConfigError(f"{spec.name} needs at least 2 stages per rank, got {len(stages)}; use 1f1b or gpipe.")
    if spec.style == "v" and len(stages) != 2:
        raise PipelineConfigError(f"{spec.name} needs exactly 2 stages per rank, got {len(stages)}.")
    n_microbatches = validate_microbatches(spec, local_batch_size, microbatch_size, pp_size, len(stages))
    if spec.single_stage:
        stage = stages[0]
        if isinstance(stage, InputGradsFirstStage):
            stage.split_last_backward = True  # each step's backward still asks splits_last_backward
        return spec.schedule_class(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    schedule = spec.schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if spec.name == "csv":
        schedule._load_csv(pipeline_parallel_schedule_csv)
    return schedule


class InputGradsFirstStage(PipelineStage):
    """A torch ``PipelineStage`` whose last backward of a step sends its input gradients before it computes its
    weight gradients, when ``split_last_backward`` is set (:func:`build_pipeline_schedule` sets it for 1F1B and
    GPipe) and :func:`splits_last_backward` allows it at that step.

    A step of those schedules ends in a chain: the last stage's backward of the last microbatch, then its
    predecessor's, down to the first stage. A predecessor waits only for the input gradients; the weight
    gradients are read by nobody before the optimizer. So this stage computes the input gradients first, the
    schedule sends them, and the weight gradients are computed at the end of the step (before the gradients are
    reduced), while the predecessor already works: the chain is shorter by one weight pass per stage. The split
    is torch's own (``backward_one_chunk(full_backward=False)`` then ``backward_weight_one_chunk``, as its
    zero-bubble schedules run it): the same matmuls, added to ``.grad`` in the same order, so the gradients are
    bitwise the ones of a full backward. What it costs: one walk of the stage's autograd graph per step, and the
    last microbatch's saved activations (with the output gradient of each op that uses a weight) stay until the
    weight pass, where a full backward frees them as it goes.

    Example (on every rank of the pipeline group, as a torch ``PipelineStage``)::

        stage = InputGradsFirstStage(stage_module, stage_index, num_stages, device, group=pp_group)
        schedule = build_pipeline_schedule(None, "1f1b", 1, 8, [stage], loss_fn)  # sets split_last_backward
    """

    split_last_backward: bool = False
    _weights_pending: int | None = None

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        if not (self.split_last_backward and full_backward and last_backward and self.has_backward
                and not self.is_first and splits_last_backward(self.submod)):
            return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                              last_backward=last_backward)
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=False, last_backward=True)
        self._weights_pending = bwd_chunk_id

    def clear_runtime_states(self) -> None:
        # A step that raised before its end leaves no weight pass for the next one to run.
        self._weights_pending = None
        super().clear_runtime_states()

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        if self._weights_pending is not None:
            chunk, self._weights_pending = self._weights_pending, None
            self.backward_weight_one_chunk(chunk, last_backward=True)
        super().perform_reduce_grad(grad_scale_factor)


def splits_last_backward(stage_module: nn.Module) -> bool:
    """Whether an :class:`InputGradsFirstStage` over ``stage_module`` may split its last backward.

    Not under DDP or FSDP, whose gradient reduction hooks the full backward of the last microbatch; not with
    activation checkpointing on, whose layers the separate weight pass would recompute once per parameter group;
    not with compiled modules, whose backward donates its buffers and so cannot keep the graph for the weight
    pass. Looked up at each step: checkpointing and compiling are turned on after the stages are built.

    Example:
        >>> import torch.nn as nn
        >>> splits_last_backward(nn.Linear(2, 2))
        True
    """
    return not any(isinstance(m, (FSDPModule, DistributedDataParallel, CheckpointWrapper))
                   or getattr(m, "gradient_checkpointing", False) is True or is_compiled(m)
                   for m in stage_module.modules())
