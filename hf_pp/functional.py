"""The functional pipeline API: building blocks that work for any ``nn.Module``.

Layering: :mod:`hf_pp.stage_math` (pure arithmetic), :mod:`hf_pp.schedules`
(torch schedule choice), :mod:`hf_pp.split` (stage modules with original
FQNs), and here the two functions that compose them:
:func:`split_model_into_stages` and :func:`pipeline_model`.

Example (the pure parts run anywhere; :func:`pipeline_model` on every rank):
    >>> from hf_pp import functional
    >>> functional.stage_ids_this_rank(0, 4, 8), functional.stage_ids_this_rank(0, 4, 8, style="v")
    ((0, 4), (0, 7))
    >>> functional.calculate_virtual_stages(num_layers=8, layers_per_stage=2, pp_size=2, is_single_stage_schedule=False)
    (4, 2)
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule
from transformers import PreTrainedModel

from .deprecation import renamed_argument
from .errors import PipelineConfigError
from .materialize import has_meta_tensors, materialize_stage
from .mesh import pp_axis
from .parallelize import check_parallelize_fn_signature, check_parts_for_schedule
from .schedules import (
    InputGradsFirstStage, ScheduleSpec, build_pipeline_schedule, read_csv_schedule_stages, resolve_schedule,
    validate_microbatches,
)
from .safetensors_reader import CheckpointIndex
from .split import copy_stage_module, tied_parameter_groups, validate_stage_fqns
from .stage_math import calculate_virtual_stages, generate_hf_model_fqn_per_model_part, stage_ids_this_rank
from .tied import make_tied_gradient_sync, pipelines_of_mesh, sync_tied_grads_in_step

__all__ = [
    "stage_ids_this_rank",
    "calculate_virtual_stages",
    "generate_hf_model_fqn_per_model_part",
    "build_pipeline_schedule",
    "plan_stage_fqns",
    "build_stage_modules",
    "make_pipeline_stages",
    "split_model_into_stages",
    "pipeline_model",
]


def _default_stage_fqns(model: nn.Module, num_stages: int) -> list[list[str]]:
    from .architectures import module_fqns_per_stage  # HF knowledge lives there

    return module_fqns_per_stage(model, num_stages)


def _num_layers(model: nn.Module) -> int:
    from .architectures import num_decoder_layers

    return num_decoder_layers(model)


def plan_stage_fqns(
    model: nn.Module,
    pp_size: int,
    spec: ScheduleSpec,
    *,
    layers_per_stage: int | None = None,
    module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
    round_to_pp_multiple: str | None = None,
    csv_path: str | None = None,
) -> tuple[list[list[str]], list[tuple[int, ...]]]:
    """``(module FQNs of every stage, stage ids of every pp rank)``, validated.

    An explicit ``module_fqns_per_model_part`` fixes the number of stages;
    otherwise the model's Hugging Face pipeline plan is used with
    :func:`calculate_virtual_stages`. Pure: no process group is touched.

    A Hugging Face model given no FQNs is checked first
    (:func:`hf_pp.architectures.require_support`): an encoder-decoder or
    vision-language model is refused by name before any layer count is read.

    Example:
        >>> from transformers import T5Config, T5ForConditionalGeneration
        >>> from hf_pp.schedules import resolve_schedule
        >>> t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
        >>> plan_stage_fqns(t5, 4, resolve_schedule("1f1b"))
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: T5ForConditionalGeneration is an encoder-decoder model; hf_pp pipelines decoder-only causal LMs.
    """
    if module_fqns_per_model_part is None and getattr(model, "config", None) is not None:
        from .architectures import require_support

        require_support(model)
    if spec.name == "csv":
        num_stages, ranks = read_csv_schedule_stages(csv_path, pp_size)
    elif module_fqns_per_model_part is not None:
        num_stages = len(module_fqns_per_model_part)
        if num_stages % pp_size != 0:
            raise PipelineConfigError(
                f"module_fqns_per_model_part has {num_stages} stages, not a multiple of pp_size={pp_size}."
            )
        per_rank = num_stages // pp_size
        if spec.single_stage and per_rank != 1:
            raise PipelineConfigError(
                f"{spec.name} runs one stage per rank but module_fqns_per_model_part gives {per_rank} per rank; "
                "use a multi-stage schedule such as interleaved_1f1b."
            )
        if not spec.single_stage and per_rank < 2:
            raise PipelineConfigError(
                f"{spec.name} needs at least 2 stages per rank but module_fqns_per_model_part gives {per_rank}; "
                "use 1f1b or gpipe, or list more stages."
            )
        ranks = None
    else:
        num_stages, _ = calculate_virtual_stages(
            _num_layers(model), layers_per_stage, pp_size, spec.single_stage, round_to_pp_multiple
        )
        ranks = None
    if ranks is None:
        ranks = [stage_ids_this_rank(r, pp_size, num_stages, spec.style) for r in range(pp_size)]
    if module_fqns_per_model_part is not None:
        fqns = [list(f) for f in module_fqns_per_model_part]
        if len(fqns) != num_stages:
            raise PipelineConfigError(f"The schedule has {num_stages} stages but module_fqns_per_model_part lists {len(fqns)}.")
    else:
        fqns = _default_stage_fqns(model, num_stages)
    validate_stage_fqns(model, fqns)
    _check_vision_on_first_stage(model, fqns)
    return fqns, ranks


def _check_vision_on_first_stage(model: nn.Module, fqns: Sequence[Sequence[str]]) -> None:
    """A VLM's image features are made and merged on the first stage: refuse a plan that puts them elsewhere."""
    from .architectures import check_support, stage_layout
    from .multimodal import check_multimodal_split, is_multimodal_config

    config = getattr(model, "config", None)
    if config is None or not is_multimodal_config(config) or not check_support(model).supported:
        return  # an explicit plan for a model hf_pp cannot lay out itself: the user's forward decides
    layout = stage_layout(model)
    embeddings = [f"{layout.prefix}.{name}" for name in layout.before]
    check_multimodal_split(model, layout.multimodal, embeddings, fqns)


def build_stage_modules(
    model: nn.Module,
    fqns_per_stage: Sequence[Sequence[str]],
    stage_ids: Sequence[int],
    device: torch.device | str | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    *,
    weights_dir: str | CheckpointIndex | None = None,
    init_adapters: Callable[[nn.Module], None] | None = None,
) -> list[nn.Module]:
    """One module per local stage, each holding only its FQNs, patched for pipelining.

    Patching replaces the ``forward`` of the stage's Hugging Face decoder and
    CausalLM wrapper instances (never the classes) with tensor-in,
    tensor-out versions; models that are not Hugging Face ``PreTrainedModel``
    are left as they are.

    A model on the meta device is never materialised whole: each stage gets
    memory on ``device`` for its own tensors only, read from ``weights_dir``
    (a ``save_pretrained`` directory) or initialised as the model class does
    (seeded by stage, so data-parallel replicas of a stage start identical).
    See :mod:`hf_pp.materialize`.
    """
    index = CheckpointIndex(weights_dir) if isinstance(weights_dir, (str, os.PathLike)) else weights_dir
    parts = []
    for stage_id in stage_ids:
        part = copy_stage_module(model, fqns_per_stage[stage_id])
        if has_meta_tensors(part):
            with _seeded_by_stage(stage_id, device):
                materialize_stage(part, device if device is not None else "cpu", index, init_adapters)
        elif weights_dir is not None:
            raise PipelineConfigError("weights_dir loads weights per stage into a meta-device model; this model already has weights.")
        elif device is not None:
            part.to(device)
        if (patch_inner_model or patch_causal_lm_model) and isinstance(model, PreTrainedModel):
            from .hf_patching import patch_hf_model_for_pp

            patch_hf_model_for_pp(part, patch_inner_model=patch_inner_model, patch_causal_lm_model=patch_causal_lm_model)
        parts.append(part)
    return parts


@contextlib.contextmanager
def _seeded_by_stage(stage_id: int, device) -> Iterator[None]:
    """Random init of one stage from (process seed + stage id): every replica of the stage agrees."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(torch.initial_seed() + stage_id)
        yield


def split_model_into_stages(
    model: nn.Module,
    pp_mesh: DeviceMesh,
    pp_axis_name: str,
    pp_schedule: str | None,
    device: torch.device | str,
    module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
    layers_per_stage: int | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    round_to_pp_multiple: str | None = None,
    pp_schedule_csv: str | None = None,
    weights_dir: str | None = None,
    *,
    module_names_per_stage: Sequence[Sequence[str]] | None = None,  # deprecated: module_fqns_per_model_part
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """Cut ``model`` into this rank's :class:`PipelineStage` objects and modules.

    Example (every rank of a 2-process ``torchrun``)::

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
        stages, parts = split_model_into_stages(
            model, mesh, "pp", "1f1b", "cpu",
            module_fqns_per_model_part=[["embedding", "layers.0"], ["layers.1", "output_proj"]],
            patch_inner_model=False, patch_causal_lm_model=False,
        )
    """
    module_fqns_per_model_part = renamed_argument("split_model_into_stages", "module_names_per_stage",
                                                  module_names_per_stage, "module_fqns_per_model_part",
                                                  module_fqns_per_model_part)
    mesh = pp_axis(pp_mesh, pp_axis_name)
    spec = resolve_schedule(pp_schedule, pp_schedule_csv)
    fqns, ranks = plan_stage_fqns(
        model, mesh.size(), spec, layers_per_stage=layers_per_stage,
        module_fqns_per_model_part=module_fqns_per_model_part, round_to_pp_multiple=round_to_pp_multiple, csv_path=pp_schedule_csv,
    )
    stage_ids = ranks[mesh.get_local_rank()]
    parts = build_stage_modules(model, fqns, stage_ids, device, patch_inner_model, patch_causal_lm_model,
                                weights_dir=weights_dir)
    stages = make_pipeline_stages(parts, stage_ids, len(fqns), device, mesh)
    return stages, parts


def make_pipeline_stages(
    parts: Sequence[nn.Module], stage_ids: Sequence[int], num_stages: int, device, mesh: DeviceMesh
) -> list[PipelineStage]:
    """Wrap this rank's stage modules in :class:`PipelineStage` objects on the 1-D ``mesh``
    (:class:`~hf_pp.schedules.InputGradsFirstStage`: 1F1B and GPipe send the input gradients of a step's last
    backward before computing its weight gradients)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return [
        InputGradsFirstStage(part, stage_id, num_stages, device, group=mesh.get_group())
        for part, stage_id in zip(parts, stage_ids)
    ]


def pipeline_model(
    model: nn.Module,
    world_mesh: DeviceMesh,
    moe_mesh: DeviceMesh | None,
    *,
    pp_axis_name: str,
    dp_axis_names: Sequence[str] | None,
    cp_axis_name: str | None = None,
    tp_axis_name: str | None = None,
    ep_axis_name: str | None = None,
    layers_per_stage: int | None,
    pipeline_parallel_schedule: str | None,
    pipeline_parallel_schedule_csv: str | None,
    microbatch_size: int,
    local_batch_size: int,
    device: torch.device | str,
    loss_fn: Callable | None,
    parallelize_fn: Callable | None = None,
    module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    scale_grads: bool = False,
    round_to_pp_multiple: str | None = None,
    weights_dir: str | CheckpointIndex | None = None,
    init_adapters: Callable[[nn.Module], None] | None = None,
    sync_tied_grads_in_step: bool = True,
) -> tuple[_PipelineSchedule, list[nn.Module], bool, bool, list[PipelineStage]]:
    """Split ``model``, parallelize each part, and build the schedule for this rank.

    Returns ``(schedule, model_parts, has_first_stage, has_last_stage, stages)``.
    Every check that depends only on the arguments runs before the model is
    touched and before any communication, identically on every rank.

    ``parallelize_fn(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names,
    cp_axis_name, tp_axis_name, ep_axis_name)`` is called on every model part
    (in place; a returned module replaces the part).

    A meta-device ``model`` is materialised stage by stage: weights read from
    ``weights_dir`` when given, else initialised; ``init_adapters`` initialises
    PEFT adapters (see :func:`build_stage_modules`).

    Weights tied across stages (e.g. input embeddings and LM head): the first
    and last stage each hold a copy, and with ``sync_tied_grads_in_step`` (the
    default) the returned schedule's ``step`` sums the copies' gradients
    across their ranks, so ``schedule.step(...)`` then ``optimizer.step()`` is
    right with no extra call, also when several steps accumulate (see
    :func:`hf_pp.tied.sync_tied_grads_in_step`). Pass False when the caller
    sums them itself once per optimizer step (:func:`hf_pp.tied.make_tied_gradient_sync`).

    Example (every rank)::

        schedule, parts, has_first, has_last, stages = pipeline_model(
            model, mesh, None, pp_axis_name="pp", dp_axis_names=None,
            layers_per_stage=None, pipeline_parallel_schedule="1f1b",
            pipeline_parallel_schedule_csv=None, microbatch_size=1, local_batch_size=8,
            device="cpu", loss_fn=loss_fn, module_fqns_per_model_part=fqns,
            patch_inner_model=False, patch_causal_lm_model=False,
        )
        schedule.step(x if has_first else None, target=y if has_last else None)
    """
    check_parallelize_fn_signature(parallelize_fn)
    if not isinstance(sync_tied_grads_in_step, bool):
        raise PipelineConfigError(f"sync_tied_grads_in_step must be True or False, got {sync_tied_grads_in_step!r}.")
    mesh = pp_axis(world_mesh, pp_axis_name)
    pp_size = mesh.size()
    spec = resolve_schedule(pipeline_parallel_schedule, pipeline_parallel_schedule_csv)
    fqns, ranks = plan_stage_fqns(
        model, pp_size, spec, layers_per_stage=layers_per_stage,
        module_fqns_per_model_part=module_fqns_per_model_part, round_to_pp_multiple=round_to_pp_multiple,
        csv_path=pipeline_parallel_schedule_csv,
    )
    stage_ids = ranks[mesh.get_local_rank()]
    validate_microbatches(spec, local_batch_size, microbatch_size, pp_size, len(stage_ids))
    dp_axis_names = _present_axes(world_mesh, dp_axis_names)

    parts = build_stage_modules(model, fqns, stage_ids, device, patch_inner_model, patch_causal_lm_model,
                                weights_dir=weights_dir, init_adapters=init_adapters)
    if parallelize_fn is not None:
        for i, part in enumerate(parts):
            result = parallelize_fn(
                part, world_mesh, moe_mesh, pp_enabled=True, dp_axis_names=dp_axis_names,
                cp_axis_name=cp_axis_name, tp_axis_name=tp_axis_name, ep_axis_name=ep_axis_name,
            )
            if isinstance(result, nn.Module):
                parts[i] = result
        check_parts_for_schedule(parts, spec)
    stages = make_pipeline_stages(parts, stage_ids, len(fqns), device, mesh)
    schedule = build_pipeline_schedule(
        pipeline_parallel_schedule_csv, pipeline_parallel_schedule, microbatch_size, local_batch_size,
        stages, loss_fn, scale_grads,
    )
    if sync_tied_grads_in_step:
        _sum_tied_grads_in_step(schedule, model, fqns, ranks, parts, world_mesh, pp_axis_name)
    has_first = any(stage.is_first for stage in stages)
    has_last = any(stage.is_last for stage in stages)
    return schedule, parts, has_first, has_last, stages


def _sum_tied_grads_in_step(schedule: _PipelineSchedule, model: nn.Module, fqns: Sequence[Sequence[str]],
                            ranks: Sequence[Sequence[int]], parts: Sequence[nn.Module], world_mesh: DeviceMesh,
                            pp_axis_name: str) -> None:
    """Make ``schedule.step`` sum the gradients of weights tied across stages (nothing when none are)."""
    if not tied_parameter_groups(model):
        return  # the same answer on every rank: none of them plans subgroups
    # Every pipeline of the mesh (one per DP replica) gets its own subgroups, planned alike on every rank.
    sync = make_tied_gradient_sync(model, fqns, ranks, parts, pp_axis(world_mesh, pp_axis_name).get_group(),
                                   pipelines_of_mesh(world_mesh, pp_axis_name))
    if sync is not None:
        sync_tied_grads_in_step(schedule, sync)


def _present_axes(world_mesh: DeviceMesh, names: Sequence[str] | None) -> tuple[str, ...] | None:
    """The named DP axes that the mesh has and that span more than one rank (None if none)."""
    if not names:
        return None
    mesh_names = world_mesh.mesh_dim_names or ()
    present = tuple(n for n in names if n in mesh_names and world_mesh[n].size() > 1)
    return present or None
