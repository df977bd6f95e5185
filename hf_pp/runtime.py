"""The pipeline a PipelineTrainer drives: stage modules, schedules per input
shape, the process groups, and the per-step gradient work (DP averaging, tied
copies, the norm over all stages). Knows nothing about the Trainer."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from .activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from .functional import make_pipeline_stages
from .grads import clip_grad_norm, tied_copies_to_skip, total_grad_norm
from .parallelize import average_replicated_grads
from .schedules import build_pipeline_schedule

__all__ = ["PipelineStagesModule", "PipelineRuntime", "pipeline_parameter_counts", "cached_by_shape", "SCHEDULES_KEPT"]

# Input shapes whose schedules (stages with their receive and gradient buffers) stay allocated, per cache.
SCHEDULES_KEPT = 8


def cached_by_shape(cache: "OrderedDict", key, build: Callable[[], object]):
    """``cache[key]``, built on first use; beyond :data:`SCHEDULES_KEPT` shapes the least recently used goes.

    Dynamic padding gives a new sequence length at almost every step; keeping every schedule would grow
    memory without bound. Every rank of a pipeline (and every DP replica, padded to one length) sees the
    same shapes in the same order, so all evict the same schedules and rebuild them together.

    Example:
        >>> cache = OrderedDict()
        >>> [cached_by_shape(cache, n, lambda: object()) is not None for n in range(SCHEDULES_KEPT + 2)][-1]
        True
        >>> len(cache), next(iter(cache))
        (8, 2)
    """
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = build()
    while len(cache) > SCHEDULES_KEPT:
        cache.popitem(last=False)
    return cache[key]


def pipeline_parameter_counts(parts: list[nn.Module], tied_groups: list[list[str]], pp_group) -> dict[str, int]:
    """Parameters of the whole pipeline, as the unsplit model counts them (tied copies once), on every rank.

    Keys: ``total``, ``trainable``, ``non_embedding`` (without ``nn.Embedding`` weights, the count
    ``num_parameters(exclude_embeddings=True)`` gives) and ``trainable_non_embedding``. One all-reduce over the pipeline group; a sharded
    (DTensor) parameter counts its whole size, as on one process.
    """
    skip = tied_copies_to_skip(tied_groups)
    counts = torch.zeros(4, dtype=torch.long)
    for part in parts:
        embeddings = {f"{name}.weight" for name, m in part.named_modules() if isinstance(m, nn.Embedding)}
        for name, param in part.named_parameters():
            if name in skip:
                continue
            size, embedding = param.numel(), name in embeddings
            counts += torch.tensor([size, size * param.requires_grad, size * (not embedding),
                                    size * (param.requires_grad and not embedding)])
    if pp_group is not None:
        device = next((p.device for part in parts for p in part.parameters()), torch.device("cpu"))
        counts = counts.to(device)
        dist.all_reduce(counts, group=pp_group)
    return dict(zip(("total", "trainable", "non_embedding", "trainable_non_embedding"), counts.tolist()))


class PipelineStagesModule(nn.Module):
    """This rank's stage modules under one root, standing in for the model.

    ``named_parameters`` yields ``parts.<i>.<original FQN>``; use
    :meth:`original_named_parameters` for the unsplit model's names.
    """

    main_input_name = "input_ids"

    def __init__(self, parts: list[nn.Module], config=None, generation_config=None,
                 parameter_counts: dict[str, int] | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.config = config
        self.generation_config = generation_config
        self.parameter_counts = parameter_counts  # of the whole pipeline, see pipeline_parameter_counts
        # Not a submodule: no stage calls it, and it must not show in names or state dicts.
        object.__setattr__(self, "_absent_input_embeddings", nn.Identity())

    def get_input_embeddings(self) -> nn.Module:
        """The input embeddings, on the rank whose first stage holds them; elsewhere a module no stage calls.

        Trainer hooks the input embeddings for NEFTune (``neftune_noise_alpha``): the noise then acts where the
        embeddings run, and the hook on the stand-in never fires.
        """
        for part in self.parts:
            try:
                embeddings = part.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                embeddings = None
            if embeddings is not None:
                return embeddings
        return self._absent_input_embeddings

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The whole model's parameter count (every stage, tied copies once), as ``PreTrainedModel.num_parameters``.

        Counts the pipeline, not this rank: ``parameters()`` yields only this rank's stages.
        """
        if self.parameter_counts is None:
            raise RuntimeError("This stage module was built without the pipeline's parameter counts.")
        key = {(False, False): "total", (True, False): "trainable", (False, True): "non_embedding",
               (True, True): "trainable_non_embedding"}[(only_trainable, exclude_embeddings)]
        return self.parameter_counts[key]

    def original_named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()

    def forward(self, *args, **kwargs):
        raise RuntimeError("A pipeline stage cannot be called directly; PipelineTrainer runs it through its schedule.")

    # Trainer's activation_checkpointing=True calls these on the model; the model here is this rank's stages.
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the decoder layers of every stage (see :mod:`hf_pp.activation_checkpointing`)."""
        enable_activation_checkpointing(self.parts, activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable_activation_checkpointing(self.parts)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.parts.modules())

    is_gradient_checkpointing = is_activation_checkpointing


class _ScheduleHandle(nn.Module):
    """What ``Trainer._wrap_model`` returns: not ``self.model``, so accelerate
    prepares only the optimizer and never wraps the stages in DDP."""

    def __init__(self, stages: PipelineStagesModule):
        super().__init__()
        self.stages = stages


@dataclass
class PipelineRuntime:
    parts: list[nn.Module]
    stage_ids: list[int]
    num_stages: int
    has_first: bool
    has_last: bool
    pp_mesh: DeviceMesh
    dp_group: dist.ProcessGroup | None
    dp_size: int
    dp_rank: int
    schedule_name: str | None
    schedule_csv: str | None
    microbatch_size: int
    device: torch.device
    loss_fn: Callable
    tied_groups: list[list[str]] = field(default_factory=list)
    tied_sync: Callable[[], None] | None = None
    loss_state: dict = field(default_factory=dict)  # read by loss_fn: the current normaliser
    first_schedule: tuple | None = None  # (batch size, schedule) from pipeline_model, not yet shaped
    _schedules: OrderedDict = field(default_factory=OrderedDict)

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.pp_mesh.get_group()

    @property
    def pp_rank(self) -> int:
        return self.pp_mesh.get_local_rank()

    def schedule_for(self, batch_size: int, seq_len: int, *, training: bool):
        """A schedule whose stages were shaped for this batch; built once per shape.

        torch fixes activation shapes at a stage's first step, so a new sequence
        length gets fresh PipelineStage objects over the same modules (at most
        :data:`SCHEDULES_KEPT` shapes are kept, see :func:`cached_by_shape`).
        """
        key = (batch_size, seq_len, training)
        if key not in self._schedules and training and self.first_schedule and self.first_schedule[0] == batch_size:
            first, self.first_schedule = self.first_schedule[1], None
            return cached_by_shape(self._schedules, key, lambda: first)

        def build():
            stages = make_pipeline_stages(self.parts, self.stage_ids, self.num_stages, self.device, self.pp_mesh)
            return build_pipeline_schedule(self.schedule_csv, self.schedule_name, self.microbatch_size, batch_size,
                                           stages, self.loss_fn, scale_grads=False)

        return cached_by_shape(self._schedules, key, build)

    def is_shaped(self, schedule) -> bool:
        """Whether ``schedule`` already ran its (one-off) shape inference."""
        return bool(getattr(schedule, "_stage_forward_initialized", False)
                    or getattr(schedule, "_stages_forward_initialized", False))

    def step_keeping_grads(self, schedule, *args, **kwargs) -> None:
        """``schedule.step``, keeping gradients accumulated by earlier steps.

        A schedule's first step infers shapes with a real forward/backward and
        then clears the gradients of FSDP modules (torch 2.13), which would drop
        what earlier gradient-accumulation steps summed. Set them aside and add
        them back; later steps need nothing of this.
        """
        if self.is_shaped(schedule):
            schedule.step(*args, **kwargs)
            return
        kept = {}
        for part in self.parts:
            for p in part.parameters():
                if p.grad is not None:
                    kept[p], p.grad = p.grad, None
        schedule.step(*args, **kwargs)
        for p, grad in kept.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)

    def share_last_stage_value(self, value: torch.Tensor) -> torch.Tensor:
        """Every pipeline rank gets the last stage's value (others contribute zero)."""
        value = value.detach().clone() if self.has_last else torch.zeros_like(value)
        dist.all_reduce(value, group=self.pp_group)
        return value

    def finish_gradients(self) -> None:
        """Once per optimizer step: average replicated gradients over DP, then make tied copies agree.

        Whatever ``parallelize_fn`` did, every parameter that is not a DTensor is
        a whole copy on each replica and is averaged here; DTensor parameters
        (FSDP shards) were reduced by their own machinery.
        """
        if self.dp_size > 1:
            average_replicated_grads(self.parts, self.dp_group, self.dp_size)
        if self.tied_sync is not None:
            self.tied_sync()

    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """Norm of the gradients of the whole pipeline (tied copies once), the same on every rank."""
        return total_grad_norm(self.parts, norm_type, pp_group=self.pp_group, tied_groups=self.tied_groups,
                               device=self.device)

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        return clip_grad_norm(self.parts, max_norm, norm_type, pp_group=self.pp_group, tied_groups=self.tied_groups,
                              device=self.device)
