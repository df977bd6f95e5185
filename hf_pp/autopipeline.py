"""AutoPipeline: split a model, build the schedule, and inspect the result in one call.

The orchestration layer over :mod:`hf_pp.functional` (splitting, schedule),
:mod:`hf_pp.layout` (whole-pipeline facts), :mod:`hf_pp.grads` (norms across
stages) and :mod:`hf_pp.visualize` (schedule picture). Everything an
inspection method reports about other ranks' stages is computed once in
:meth:`AutoPipeline.build` from the unsplit model and the stage plan, which
every rank knows; so no inspection method runs a collective and any single
rank may call them (e.g. only rank 0 prints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from . import grads
from .architectures import is_sequence_classifier
from .balance import DEFAULT_BALANCE, balanced_module_fqns, check_balance_options
from .deprecation import renamed_argument, warn_deprecated
from .errors import PipelineConfigError
from .functional import pipeline_model, plan_stage_fqns
from .layout import StageFacts, compact_fqns, expected_bubble_fraction, stage_facts
from .materialize import check_hub_kwargs, meta_model_from_pretrained
from .safetensors_reader import CheckpointIndex
from .mesh import default_device, pp_axis
from .peft_utils import check_peft_model_can_split, is_peft_model, unwrap_peft
from .reliability import release_at_exit
from .schedules import resolve_schedule, validate_microbatches
from .split import tied_parameter_groups
from .tied import tied_gradient_sync_of

__all__ = ["AutoPipeline", "PipelineInfo"]


@dataclass
class PipelineInfo:
    """What this rank runs: ``enabled`` is False until :meth:`AutoPipeline.build`.

    After ``build``: whether this rank holds the first / last stage, the torch
    schedule, this rank's stage modules (``model_parts``) and ``PipelineStage`` objects.

    Example:
        >>> info = PipelineInfo()
        >>> info.enabled, info.has_first_stage, info.model_parts
        (False, False, None)
    """

    enabled: bool = False
    has_first_stage: bool = False
    has_last_stage: bool = False
    schedule: Any = None
    model_parts: list[nn.Module] | None = None
    stages: list[Any] | None = None


@dataclass(frozen=True)
class _Layout:
    """The whole pipeline as every rank sees it (gathered without communication)."""

    fqns_per_stage: list[list[str]]
    stage_ids_per_rank: list[tuple[int, ...]]
    facts: list[StageFacts]
    tied_groups: list[list[str]]
    n_microbatches: int
    pp_rank: int
    model_name: str = ""
    stage_rank: dict[int, int] = field(default_factory=dict)
    sequence_classifier: bool = False  # its last stage reads each row at ``last_token_index``
    multimodal: Any = None  # a VLM's MultimodalLayout: step() turns its image inputs into stage kwargs


def _multimodal_layout_of(model: nn.Module) -> Any:
    """The VLM layout of a supported Hugging Face vision-language model, else None."""
    from .architectures import check_support, stage_layout
    from .multimodal import is_multimodal_config

    config = getattr(model, "config", None)
    if config is None or not is_multimodal_config(config) or not check_support(model).supported:
        return None
    return stage_layout(model).multimodal


class AutoPipeline:
    """Pipeline-parallel training of a model in one call, with inspection tools.

    Construct it with the device mesh and pipeline settings (all checked at
    once, identically on every rank), then :meth:`build` the model. Example
    (every rank of ``torchrun --nproc-per-node 2``)::

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
        ap = AutoPipeline(mesh, pp_schedule="1f1b", pp_batch_size=8).build(model, loss_fn=loss_fn)
        losses = []
        ap.step(input_ids, target=labels, losses=losses)   # same call on every rank
        norm = ap.clip_grad_norm(1.0)
        if dist.get_rank() == 0:
            print(ap.pretty_print_stages())

    ``pp_balance`` chooses where the layers are cut: "auto" (the default:
    estimated FLOPs of microbatches of ``pp_microbatch_size`` x
    ``pp_balance_seq_len`` tokens, default 512, from the config alone, no
    collective; an explicit ``module_fqns_per_model_part`` or a model without a
    plan hf_pp knows is cut as "layers"), "layers" (the same number per stage),
    "params" or "time" (see :mod:`hf_pp.balance`; "time" profiles such
    microbatches in :meth:`build`, a collective over the default process group).
    """

    def __init__(
        self,
        world_mesh: DeviceMesh,
        moe_mesh: DeviceMesh | None = None,
        pp_axis_name: str = "pp",
        dp_axis_names: Sequence[str] | None = ("dp",),
        cp_axis_name: str | None = None,
        tp_axis_name: str | None = None,
        ep_axis_name: str | None = None,
        pp_schedule: str | None = "1f1b",
        pp_schedule_csv: str | None = None,
        pp_microbatch_size: int = 1,
        pp_batch_size: int = 1,
        layers_per_stage: int | None = None,
        round_to_pp_multiple: str | None = None,
        module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
        patch_inner_model: bool = True,
        patch_causal_lm_model: bool = True,
        scale_grads: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pp_balance: str = DEFAULT_BALANCE,
        pp_balance_seq_len: int | None = None,
        *,
        round_virtual_stages_to_pp_multiple: str | None = None,  # deprecated: round_to_pp_multiple
        scale_grads_in_schedule: bool | None = None,  # deprecated: scale_grads
    ):
        round_to_pp_multiple = renamed_argument("AutoPipeline", "round_virtual_stages_to_pp_multiple",
                                                round_virtual_stages_to_pp_multiple, "round_to_pp_multiple",
                                                round_to_pp_multiple)
        scale_grads = renamed_argument("AutoPipeline", "scale_grads_in_schedule", scale_grads_in_schedule,
                                       "scale_grads", scale_grads, default=False)
        self.pp_mesh = pp_axis(world_mesh, pp_axis_name)  # raises if the axis is missing
        if pp_microbatch_size < 1 or pp_batch_size < 1 or pp_batch_size % pp_microbatch_size != 0:
            raise PipelineConfigError(
                f"pp_batch_size ({pp_batch_size}) must be a positive multiple of pp_microbatch_size "
                f"({pp_microbatch_size}); e.g. pp_microbatch_size=1."
            )
        self.spec = resolve_schedule(pp_schedule, pp_schedule_csv)
        check_balance_options(pp_balance, module_fqns_per_model_part, pp_balance_seq_len)
        self.pp_balance, self.pp_balance_seq_len = pp_balance, pp_balance_seq_len
        self.world_mesh, self.moe_mesh = world_mesh, moe_mesh
        self.pp_axis_name = pp_axis_name
        self.dp_axis_names = tuple(dp_axis_names) if dp_axis_names else None
        self.cp_axis_name, self.tp_axis_name, self.ep_axis_name = cp_axis_name, tp_axis_name, ep_axis_name
        self.pp_schedule, self.pp_schedule_csv = pp_schedule, pp_schedule_csv
        self.pp_microbatch_size, self.pp_batch_size = pp_microbatch_size, pp_batch_size
        self.layers_per_stage = layers_per_stage
        self.round_to_pp_multiple = round_to_pp_multiple
        self.module_fqns_per_model_part = module_fqns_per_model_part
        self.patch_inner_model, self.patch_causal_lm_model = patch_inner_model, patch_causal_lm_model
        self.scale_grads = scale_grads
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self._info = PipelineInfo()
        self._layout: _Layout | None = None
        self._tied_sync: Callable[[], None] | None = None

    # ---- building -----------------------------------------------------------
    def build(self, model: nn.Module | str, *, loss_fn: Callable | None = None,
              parallelize_fn: Callable | None = None, from_pretrained_kwargs: dict | None = None) -> "AutoPipeline":
        """Split ``model`` into this rank's stages and build the schedule; returns ``self``.

        ``loss_fn(output, target)`` runs per microbatch on the last stage.
        ``parallelize_fn(part, world_mesh, moe_mesh, *, pp_enabled, dp_axis_names,
        cp_axis_name, tp_axis_name, ep_axis_name)`` is applied to each stage
        module (FSDP2, TP, ...). ``model`` itself is left whole and unchanged.
        A ``peft.PeftModel`` is split through its base model, so each adapter
        lives on the stage of the layer it adapts.

        For models too large for one process, ``model`` may be a local
        ``save_pretrained`` directory or a hub id (resolved as ``from_pretrained``
        resolves it, with ``from_pretrained_kwargs`` such as ``revision``; built on
        the meta device; each rank reads only its stages' tensors, through
        transformers' weight conversion, in ``dtype`` or the checkpoint's own) or a
        model on the meta device (stages initialised fresh, seeded by stage:
        call ``torch.manual_seed`` with the same seed on every rank first).
        """
        weights_dir = None
        if isinstance(model, (str, os.PathLike)):
            hub = check_hub_kwargs(from_pretrained_kwargs)
            model, weights_dir = (meta_model_from_pretrained(os.fspath(model), dtype=self.dtype or "auto", **hub),
                                  CheckpointIndex(os.fspath(model), **hub))
        if self._info.enabled:
            raise PipelineConfigError("This AutoPipeline is already built; create a new one for another model.")
        if is_peft_model(model):
            # The adapters live inside the base model's layers: split that, and each adapter follows its layer.
            check_peft_model_can_split(model, self.module_fqns_per_model_part)
            model = unwrap_peft(model)
        if loss_fn is None:
            raise PipelineConfigError(
                "build() needs loss_fn(output, target), run on the last stage per microbatch, "
                "e.g. build(model, loss_fn=hf_pp.losses.causal_lm_loss)."
            )
        pp_size, pp_rank = self.pp_mesh.size(), self.pp_mesh.get_local_rank()
        plan = self._stage_plan(model)
        fqns, ranks = plan_stage_fqns(
            model, pp_size, self.spec, layers_per_stage=self.layers_per_stage, module_fqns_per_model_part=plan,
            round_to_pp_multiple=self.round_to_pp_multiple, csv_path=self.pp_schedule_csv,
        )
        n_micro = validate_microbatches(self.spec, self.pp_batch_size, self.pp_microbatch_size, pp_size, len(ranks[0]))
        tied = tied_parameter_groups(model)
        self._layout = _Layout(
            fqns_per_stage=fqns, stage_ids_per_rank=list(ranks), facts=stage_facts(model, fqns), tied_groups=tied,
            n_microbatches=n_micro, pp_rank=pp_rank, model_name=type(model).__name__,
            stage_rank={s: r for r, ids in enumerate(ranks) for s in ids},
            sequence_classifier=is_sequence_classifier(model) and self.patch_causal_lm_model,
            multimodal=_multimodal_layout_of(model) if self.patch_causal_lm_model else None,
        )
        schedule, parts, has_first, has_last, stages = pipeline_model(
            model, self.world_mesh, self.moe_mesh, pp_axis_name=self.pp_axis_name, dp_axis_names=self.dp_axis_names,
            cp_axis_name=self.cp_axis_name, tp_axis_name=self.tp_axis_name, ep_axis_name=self.ep_axis_name,
            layers_per_stage=self.layers_per_stage, pipeline_parallel_schedule=self.pp_schedule,
            pipeline_parallel_schedule_csv=self.pp_schedule_csv, microbatch_size=self.pp_microbatch_size,
            local_batch_size=self.pp_batch_size, device=self.device, loss_fn=loss_fn,
            parallelize_fn=self._with_dtype(parallelize_fn), module_fqns_per_model_part=plan,
            patch_inner_model=self.patch_inner_model, patch_causal_lm_model=self.patch_causal_lm_model,
            scale_grads=self.scale_grads, round_to_pp_multiple=self.round_to_pp_multiple,
            weights_dir=weights_dir,
        )
        self._info = PipelineInfo(True, has_first, has_last, schedule, parts, stages)
        # pipeline_model made schedule.step sum the tied copies' gradients (None when nothing is tied).
        self._tied_sync = tied_gradient_sync_of(schedule)
        release_at_exit(self)
        return self

    def _release_pipeline(self) -> None:
        """Drop the stages, schedule and process-group handles (at interpreter exit, see :func:`release_at_exit`)."""
        self._info, self._tied_sync = PipelineInfo(), None

    def _stage_plan(self, model: nn.Module) -> Sequence[Sequence[str]] | None:
        """The user's plan, or the one ``pp_balance`` computes (once; "time" profiles, a collective)."""
        if self.pp_balance == "layers" or self.module_fqns_per_model_part is not None:
            return self.module_fqns_per_model_part
        return balanced_module_fqns(
            model, self.pp_mesh.size(), self.spec, self.pp_balance, layers_per_stage=self.layers_per_stage,
            round_to_pp_multiple=self.round_to_pp_multiple, csv_path=self.pp_schedule_csv,
            microbatch_size=self.pp_microbatch_size, seq_len=self.pp_balance_seq_len, device=self.device, dtype=self.dtype,
        )

    def _with_dtype(self, parallelize_fn: Callable | None) -> Callable | None:
        """Cast each stage before the user's parallelize_fn, so sharding sees the final dtype."""
        if self.dtype is None:
            return parallelize_fn
        dtype = self.dtype

        def cast_then_parallelize(part, *args, **kwargs):
            part.to(dtype)
            if parallelize_fn is None:
                return part
            result = parallelize_fn(part, *args, **kwargs)
            return part if result is None else result

        return cast_then_parallelize

    # ---- running --------------------------------------------------------------
    @property
    def info(self) -> PipelineInfo:
        """This rank's pipeline; ``info.enabled`` is False before :meth:`build`."""
        return self._info

    @property
    def parts(self) -> list[nn.Module]:
        """This rank's stage modules (keeping the unsplit model's FQNs)."""
        self._require_built("parts")
        return self._info.model_parts

    def step(self, input_ids: torch.Tensor | None = None, *, target: torch.Tensor | None = None,
             losses: list | None = None, return_outputs: bool = False, **kwargs) -> Any:
        """One forward and backward of the whole batch through the pipeline.

        Call it on every rank with the same arguments: the inputs reach only the
        first stage and ``target`` only the last (other ranks ignore them), while
        ``kwargs`` go to every stage, split into microbatches on dim 0. On the
        last stage, ``losses`` receives one loss per microbatch. With
        ``return_outputs=True`` the last stage also returns the outputs of all
        microbatches merged (the logits of the whole batch); by default it
        returns None, as other ranks do: each microbatch's output is then freed
        after its backward instead of being kept to the end of the step and
        copied into one tensor (8 microbatches of 128 tokens at a 32k vocabulary:
        128 MB kept, 128 MB copied per step). Gradients accumulate into the stage
        parameters, the copies of tied weights already summed across their
        ranks: step the optimizer next (or step again to accumulate).

        A vision-language model takes its processor's batch as it is (``input_ids``
        on every rank, ``pixel_values``, ``image_grid_thw``, ``token_type_ids`` ... as
        ``kwargs``): positions and masks are computed from it before the schedule and
        the images are cut into microbatches by sample (see :mod:`hf_pp.multimodal`).
        """
        info = self._require_built("step")
        if info.has_first_stage and input_ids is None:
            raise PipelineConfigError("step() needs input_ids on the rank holding the first stage; pass them on every rank.")
        if info.has_last_stage and target is None:
            raise PipelineConfigError("step() needs target on the rank holding the last stage; pass it on every rank.")
        if self._layout.sequence_classifier and kwargs.get("last_token_index") is None:
            # Checked on every rank, before the schedule: the last stage alone would fail, its peers would wait.
            raise PipelineConfigError(
                f"step() of a {self._layout.model_name} needs last_token_index, the position each row is read at: "
                "pass last_token_index=hf_pp.hf_patching.last_token_index(input_ids, config.pad_token_id) on every rank."
            )
        if self._layout.multimodal is not None:
            kwargs = self._multimodal_step_kwargs(input_ids, kwargs)
        args = (input_ids,) if info.has_first_stage else ()
        return info.schedule.step(*args, target=target if info.has_last_stage else None, losses=losses,
                                  return_outputs=return_outputs, **kwargs)

    def _multimodal_step_kwargs(self, input_ids: torch.Tensor | None, kwargs: dict) -> dict:
        """A VLM's batch (the processor's ``pixel_values``, grids, ``token_type_ids`` ... as ``kwargs``) as every
        stage takes it: positions and masks computed from the whole batch, images regrouped per sample
        (:func:`hf_pp.multimodal.multimodal_stage_inputs`)."""
        if input_ids is None:
            raise PipelineConfigError(
                f"step() of a {self._layout.model_name} needs input_ids on every rank: its positions and masks are "
                "computed from the token ids before the schedule."
            )
        from .multimodal import multimodal_stage_inputs

        prepared = multimodal_stage_inputs(self.parts[0], self._layout.multimodal, {"input_ids": input_ids, **kwargs})
        kept = {k: v for k, v in kwargs.items() if k in ("attention_mask", "last_token_index")}
        return {**kept, **prepared}

    # ---- gradients -------------------------------------------------------------
    def sync_tied_grads(self) -> None:
        """Nothing left to do: every ``step`` of ``info.schedule`` already summed the gradients of tied copies.

        Kept so code written for the older API runs unchanged; it never adds the
        copies twice, however often it is called. No collective.
        """
        self._require_built("sync_tied_grads")

    def scale_grads_by_divisor(self, divisor: float) -> None:
        """Divide this rank's stage gradients by ``divisor`` (no communication)."""
        grads.scale_grads_by_divisor(self.parts, divisor)

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip all stages' gradients to total norm ``max_norm``; every rank gets the same total.

        Collective over the pipeline group (and FSDP shard groups): call it on
        every rank, after the last :meth:`step` before the optimizer. Tied copies count once.
        """
        parts = self.parts
        return grads.clip_grad_norm(
            parts, max_norm, norm_type, pp_group=self.pp_mesh.get_group(), tied_groups=self._layout.tied_groups,
            device=self.device,
        )

    # ---- inspection (no collectives) ---------------------------------------------
    def list_stage_modules(self) -> list[list[str]]:
        """Module FQNs of every stage of the pipeline, in stage order."""
        return [list(f) for f in self._built_layout("list_stage_modules").fqns_per_stage]

    def get_stage_param_counts(self, trainable_only: bool = False) -> list[int]:
        """Parameters of every stage (a tied weight counted once, where its first name lives)."""
        facts = self._built_layout("get_stage_param_counts").facts
        return [f.trainable_params if trainable_only else f.params for f in facts]

    def get_total_param_count(self, trainable_only: bool = False) -> int:
        """Parameters of the whole pipeline; equals the unsplit model's count."""
        return sum(self.get_stage_param_counts(trainable_only))

    def stage_ranks(self) -> list[int]:
        """The pipeline rank that runs each stage."""
        layout = self._built_layout("stage_ranks")
        return [layout.stage_rank[s] for s in range(len(layout.fqns_per_stage))]

    def debug_summary(self) -> str:
        """A few lines describing the layout, this rank's role, and the expected bubble."""
        layout, info = self._built_layout("debug_summary"), self._info
        pp_size, num_stages = len(layout.stage_ids_per_rank), len(layout.fqns_per_stage)
        v = num_stages // pp_size
        lines = [
            f"AutoPipeline: {layout.model_name}, schedule {self.spec.name}, pp_size {pp_size}, "
            f"{num_stages} stages ({v} per rank)",
            f"batch {self.pp_batch_size} = {layout.n_microbatches} microbatches of {self.pp_microbatch_size}; "
            f"expected bubble {expected_bubble_fraction(pp_size, layout.n_microbatches, v):.1%}",
            f"this rank: pp rank {layout.pp_rank}, stages {list(layout.stage_ids_per_rank[layout.pp_rank])}, "
            f"first stage {info.has_first_stage}, last stage {info.has_last_stage}, device {self.device}",
            f"parameters: {self.get_total_param_count():,} total, {self.get_total_param_count(True):,} trainable",
        ]
        if layout.tied_groups:
            lines.append("tied weights (gradients summed across their stages): "
                         + "; ".join(" = ".join(g) for g in layout.tied_groups))
        return "\n".join(lines)

    def pretty_print_stages(self, max_modules_per_stage: int = 16) -> str:
        """A table of every stage: rank, parameters (and share), modules (layer runs compacted)."""
        layout = self._built_layout("pretty_print_stages")
        total = max(1, self.get_total_param_count())
        ranks = self.stage_ranks()
        lines = []
        for stage, (fqns, facts) in enumerate(zip(layout.fqns_per_stage, layout.facts)):
            mods = compact_fqns(fqns)
            shown = mods[:max_modules_per_stage]
            more = f", ... (+{len(mods) - len(shown)} more)" if len(mods) > len(shown) else ""
            lines.append(f"Stage {stage} (rank {ranks[stage]}): {facts.params:,} params "
                         f"({facts.params / total:.1%}), {facts.bytes_held / 2**20:.1f} MiB weights")
            lines.append("    " + ", ".join(shown) + more)
        return "\n".join(lines)

    def visualize_current_schedule(self, filename: str) -> str:
        """Write a PNG of the schedule this pipeline runs (all ranks); returns ``filename``."""
        from .visualize import draw_schedule, ops_from_schedule

        info = self._require_built("visualize_current_schedule")
        layout = self._layout
        actions = ops_from_schedule(info.schedule, len(layout.stage_ids_per_rank))
        title = f"{self.spec.name}: pp={len(layout.stage_ids_per_rank)}, {layout.n_microbatches} microbatches"
        return draw_schedule(actions, filename, title=title)

    # ---- deprecated names (one release) ------------------------------------------
    @property
    def round_virtual_stages_to_pp_multiple(self) -> str | None:
        """Deprecated name of :attr:`round_to_pp_multiple`."""
        warn_deprecated("AutoPipeline.round_virtual_stages_to_pp_multiple", "AutoPipeline.round_to_pp_multiple")
        return self.round_to_pp_multiple

    @property
    def scale_grads_in_schedule(self) -> bool:
        """Deprecated name of :attr:`scale_grads`."""
        warn_deprecated("AutoPipeline.scale_grads_in_schedule", "AutoPipeline.scale_grads")
        return self.scale_grads

    # ---- helpers ------------------------------------------------------------------
    def _require_built(self, what: str) -> PipelineInfo:
        if not self._info.enabled:
            raise PipelineConfigError(f"{what} needs a built pipeline: call AutoPipeline(...).build(model, loss_fn=...) first.")
        return self._info

    def _built_layout(self, what: str) -> _Layout:
        self._require_built(what)
        return self._layout
