"""Building the pipeline a trainer drives: the model it is given, the checks before the first collective,
the split into this rank's stages, and the Trainer hooks that place and wrap the model."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn
from accelerate.data_loader import prepare_data_loader
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import enable_full_determinism, set_seed

from .architectures import is_sequence_classifier, is_token_classifier, stage_layout
from .multimodal import is_multimodal_config
from .balance import balanced_module_fqns, first_batch_seq_len
from .compile import compile_stage_layers
from .deprecation import warn_deprecated
from .errors import PipelineConfigError
from .functional import pipeline_model, plan_stage_fqns
from .materialize import (
    auto_class_for, check_dtype_runs, check_hub_kwargs, has_meta_tensors, load_pretrained_config, materialize_stage,
    meta_model_from_pretrained, resolve_dtype,
)
from .mesh import build_world_mesh
from .parallelize import ddp_parallelize_fn, fsdp_parallelize_fn
from .peft_utils import (
    check_adapters_can_initialize, check_peft_config_can_initialize, check_peft_model_can_split, is_peft_model,
    make_adapter_initializer, unwrap_peft, weightless_copy,
)
from .preflight import check_model_weights, validate_pipeline_setup
from .reliability import agree_before_start, config_fingerprint, release_at_exit
from .safetensors_reader import CheckpointIndex
from .runtime import PipelineRuntime, PipelineStagesModule, _ScheduleHandle, pipeline_parameter_counts
from .schedules import resolve_schedule
from .split import tied_parameter_groups
from .tied import make_tied_gradient_sync, pipelines_of_mesh

__all__ = ["resolve_model", "preflight", "BuildOverrides"]


def resolve_model(model: nn.Module | str | None, args, peft_config: Any,
                  from_pretrained_kwargs: dict | None = None) -> tuple[nn.Module | None, CheckpointIndex | None]:
    """``(model to hand to Trainer, checkpoint to read stage weights from)``.

    A local directory or a hub id (resolved as ``from_pretrained`` resolves it, with
    ``from_pretrained_kwargs`` such as ``revision``, ``token``, ``cache_dir``, ``subfolder``) becomes a
    meta-device model when pipelining (its tensors are read per stage later, from the shards each stage
    needs) and a normal ``from_pretrained`` model otherwise; a meta-device model without pipelining is
    initialised whole. ``peft_config`` wraps the result with ``peft.get_peft_model``.
    """
    pipelining = getattr(args, "pp_size", 1) > 1
    dtype = getattr(args, "pp_load_dtype", "auto")
    hub = check_hub_kwargs(from_pretrained_kwargs)
    weights = None
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if pipelining:
            model = meta_model_from_pretrained(source, dtype=dtype, **hub)
            weights = CheckpointIndex(source, **hub)
        else:
            model = auto_class_for(load_pretrained_config(source, **hub)).from_pretrained(
                source, dtype=dtype if dtype == "auto" else resolve_dtype(dtype), **hub
            )
    elif hub:
        raise PipelineConfigError("from_pretrained_kwargs apply to a model given as a directory or hub id, not a model.")
    elif model is not None and not pipelining and has_meta_tensors(model):
        device = args.device if args is not None else "cpu"
        check_dtype_runs(next(model.parameters()).dtype, device)
        materialize_stage(model, device)
    if peft_config is not None:
        if model is None:
            raise PipelineConfigError("peft_config needs a model (or a model directory) to wrap.")
        if is_peft_model(model):
            raise PipelineConfigError("The model is already a PeftModel; drop peft_config or pass the base model.")
        from peft import get_peft_model

        if has_meta_tensors(model):
            check_peft_config_can_initialize(peft_config)
        model = get_peft_model(model, peft_config)
    return model, weights


def preflight(model, args, trainer_kwargs: dict, parallelize_fn: Callable | None = None,
              weights_dir: CheckpointIndex | None = None, module_fqns: list[list[str]] | None = None,
              extra_checks: Callable[[], None] | None = None) -> None:
    """Pure checks on every rank (:mod:`hf_pp.preflight`), then one exchange: all ranks agree or all raise.

    ``extra_checks`` are a trainer class's own (e.g. the TRL options), run with the others.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.device  # noqa: B018 - Trainer would start the process group (with ddp_timeout) here anyway
    dataset = trainer_kwargs.get("train_dataset")
    fingerprint = config_fingerprint(
        args, unwrap_peft(model) if model is not None else None, world_size=os.environ.get("WORLD_SIZE", "1"),
        # Nodes of different sizes (processes per node) are refused: the ranks name the difference.
        processes_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        torch=torch.__version__, dataset_size=len(dataset) if hasattr(dataset, "__len__") else None,
        parallelize_fn=getattr(parallelize_fn, "__qualname__", None), module_fqns_per_model_part=module_fqns,
    )

    def checks() -> None:
        if extra_checks is not None:
            extra_checks()
        check_peft_model_can_split(model, module_fqns)  # first: names the PEFT problem before the stage checks
        validate_pipeline_setup(model, args, trainer_kwargs, parallelize_fn, module_fqns_per_model_part=module_fqns)
        check_model_weights(unwrap_peft(model), args.device, weights_dir)
        if is_peft_model(model) and has_meta_tensors(model):
            check_adapters_can_initialize(model, model.peft_config)

    agree_before_start(checks, fingerprint)


class BuildOverrides:
    """Model placement and the split (mixed into PipelineMixin)."""

    def _first_model_from_init(self, model: Any, model_init: Callable, args) -> Any:
        """The model ``model_init`` builds, seeded as Trainer seeds it; the split needs it before Trainer starts."""
        if model is not None:
            raise PipelineConfigError("Pass either `model` or `model_init` to the trainer, not both.")
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self.model_init = model_init
        self._pp = None
        return super().call_model_init()

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Trainer's ``call_model_init``; under pipelining the fresh model is split and replaces the stages.

        ``train()`` calls it at the start of every run (and every hyperparameter
        trial) when the trainer was given ``model_init``, as Trainer does.
        """
        model = super().call_model_init(trial)
        if self._pp is None:
            return model
        return self._rebuild_pipeline(model)

    def _rebuild_pipeline(self, model: Any) -> nn.Module:
        """Split ``model`` (after the same checks as the first build) in place of the current stages."""
        model, weights_dir = resolve_model(model, self.args, self._pp_peft_config)  # model_init gives a model
        preflight(model, self.args, {"train_dataset": self.train_dataset, "data_collator": self.data_collator},
                  self._pp_parallelize_fn, weights_dir, self._pp_module_fqns)
        self._release_pipeline()
        for cached in ("_pp_layout", "_pp_eval_schedules"):  # both describe the stages being replaced
            self.__dict__.pop(cached, None)
        self.model, self._pp_weights_dir = model, weights_dir
        self._pp = self._build_pipeline(self._pp_parallelize_fn)
        return self.model

    def _build_pipeline(self, parallelize_fn: Callable | None) -> PipelineRuntime:
        args = self.args
        # With PEFT the pipeline splits the Hugging Face model inside the PeftModel:
        # its layers already carry the adapters, so each adapter follows its layer.
        self._pp_model_class_name = type(self.model).__name__  # what Trainer would hold (a model card names its task)
        self._pp_trainer_optimizer_order = self._trainer_optimizer_order(self.model)
        # Adapter bookkeeping (names, configuration) needs no weights: keep a weightless copy, so that the
        # user's PeftModel, once they drop it, is freed like any other model after the split.
        self._peft_model = weightless_copy(self.model) if is_peft_model(self.model) else None
        model = unwrap_peft(self.model)
        mesh = build_world_mesh(args.pp_size, device_type=args.device.type)
        dp_size = mesh["dp"].size()
        tied = tied_parameter_groups(model)
        config = getattr(model, "config", None)
        self._pp_pooled = is_sequence_classifier(model)
        self._pp_multimodal = stage_layout(model).multimodal if config is not None and is_multimodal_config(config) else None
        self._pp_loss_info = {
            "config": config, "loss_function": getattr(model, "loss_function", None),
            "vocab": getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", None),
            # Trainer's rule: the label smoother shifts labels for the causal-LM classes.
            "smoother_shifts": model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
            "token_classifier": is_token_classifier(model),
        }
        loss_state: dict[str, Any] = {"num_items": None, "scale": 1, "samples": None, "batch_items": None}
        loss_fn = self._pipeline_loss_fn(loss_state)
        init_adapters = make_adapter_initializer(self._peft_model.peft_config) if self._peft_model is not None else None
        plan = self._balanced_plan(model)
        schedule, parts, has_first, has_last, stages = pipeline_model(
            model, mesh, None, pp_axis_name="pp", dp_axis_names=("dp",), module_fqns_per_model_part=plan,
            layers_per_stage=args.pp_layers_per_stage, pipeline_parallel_schedule=args.pp_schedule,
            pipeline_parallel_schedule_csv=args.pp_schedule_csv, microbatch_size=args.pp_microbatch_size,
            local_batch_size=args.per_device_train_batch_size, device=args.device, loss_fn=loss_fn,
            parallelize_fn=parallelize_fn or self._default_parallelize_fn(dp_size), patch_inner_model=args.pp_patch_inner_model,
            patch_causal_lm_model=args.pp_patch_causal_lm_model, round_to_pp_multiple=args.pp_round_virtual_stages,
            weights_dir=self._pp_weights_dir, init_adapters=init_adapters,
            sync_tied_grads_in_step=False,  # the runtime sums tied copies once per optimizer step instead
        )
        if args.torch_compile:
            # Trainer compiles through accelerate's prepare, which never sees the stages: compile them here.
            compile_stage_layers(parts, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
        runtime = PipelineRuntime(
            parts=parts, stage_ids=[s.stage_index for s in stages], num_stages=stages[0].num_stages,
            has_first=has_first, has_last=has_last, pp_mesh=mesh["pp"],
            dp_group=mesh["dp"].get_group() if dp_size > 1 else None, dp_size=dp_size, dp_rank=mesh["dp"].get_local_rank(),
            schedule_name=args.pp_schedule, schedule_csv=args.pp_schedule_csv,
            microbatch_size=args.pp_microbatch_size, device=args.device, loss_fn=loss_fn,
            tied_groups=tied, loss_state=loss_state,
            first_schedule=(args.per_device_train_batch_size, schedule),
        )
        if tied:
            fqns, ranks = plan_stage_fqns(
                model, args.pp_size, resolve_schedule(args.pp_schedule, args.pp_schedule_csv),
                layers_per_stage=args.pp_layers_per_stage, round_to_pp_multiple=args.pp_round_virtual_stages,
                csv_path=args.pp_schedule_csv, module_fqns_per_model_part=plan,
            )
            # Every pipeline of the mesh (one per DP replica) gets its own subgroups.
            runtime.tied_sync = make_tied_gradient_sync(model, fqns, ranks, parts, mesh["pp"].get_group(),
                                                        pipelines_of_mesh(mesh, "pp"))
        # Trainer keeps only the batch columns the model's forward accepts: read them from the real model.
        self._set_signature_columns_if_needed()
        counts = pipeline_parameter_counts(parts, tied, mesh["pp"].get_group())
        self.model = self.model_wrapped = PipelineStagesModule(parts, config, getattr(model, "generation_config", None),
                                                               parameter_counts=counts)
        self._pp_handle = _ScheduleHandle(self.model)
        self.callback_handler.model = self.model  # Trainer gave callbacks the unsplit model: keep no reference to it
        release_at_exit(self)
        self._shard_data_by_dp_rank(mesh["dp"].get_local_rank(), dp_size)
        return runtime

    def _trainer_optimizer_order(self, model: nn.Module) -> list[str]:
        """The parameters of Trainer's optimizer over the unsplit ``model``, in its index order, by stage FQN.

        Trainer groups trainable parameters into weight-decay and no-decay groups in ``named_parameters``
        order; its ``optimizer.pt`` numbers them so. A Trainer checkpoint resumes under the pipeline by it.
        """
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        prefix = "base_model.model." if is_peft_model(model) else ""
        order = [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]
        return [n[len(prefix):] if n.startswith(prefix) else n for n in order]

    def _balanced_plan(self, model: nn.Module) -> list[list[str]] | None:
        """The stage plan ``args.pp_balance`` asks for, computed once (None: layers spread evenly).

        An explicit ``module_fqns_per_model_part`` is the plan as given (preflight
        refused it with "params" and "time"). "auto" estimates and "time" profiles
        microbatches of ``pp_microbatch_size`` x ``pp_balance_seq_len`` tokens
        (default: the first collated training batch's length, computed locally
        from the same samples on every rank); only "time" is a collective.
        """
        if self._pp_module_fqns is not None:
            return self._pp_module_fqns
        args = self.args
        seq_len = args.pp_balance_seq_len
        if args.pp_balance in ("auto", "time") and seq_len is None:
            seq_len = first_batch_seq_len(self.train_dataset, self.data_collator, args.per_device_train_batch_size)
        return balanced_module_fqns(
            model, args.pp_size, resolve_schedule(args.pp_schedule, args.pp_schedule_csv), args.pp_balance,
            layers_per_stage=args.pp_layers_per_stage, round_to_pp_multiple=args.pp_round_virtual_stages,
            csv_path=args.pp_schedule_csv, microbatch_size=args.pp_microbatch_size, seq_len=seq_len, device=args.device,
        )

    def _release_pipeline(self) -> None:
        """Drop the stages, schedules and process-group handles (at interpreter exit; the trainer is done)."""
        self._pp = None
        self.model = self.model_wrapped = self._pp_handle = None
        self.optimizer = self.lr_scheduler = None

    def _default_parallelize_fn(self, dp_size: int) -> Callable | None:
        """The ``pp_data_parallel`` hook when there is a DP dimension: FSDP2 inside each stage, or DDP replicas."""
        if dp_size == 1:
            return None
        if self.args.pp_data_parallel == "fsdp":
            return fsdp_parallelize_fn(param_dtype=torch.bfloat16 if self.args.bf16 else None)
        return ddp_parallelize_fn()

    def _shard_data_by_dp_rank(self, dp_rank: int, dp_size: int) -> None:
        """All ranks of one pipeline must read the same batches: shard by DP rank, not world rank.

        Patches this trainer's accelerator instance (only) to prepare data loaders that way.
        """
        accelerator = self.accelerator

        def prepare_by_dp(data_loader, device_placement=None, slice_fn_for_dispatch=None):
            prepared = prepare_data_loader(
                data_loader, accelerator.device, num_processes=dp_size, process_index=dp_rank,
                split_batches=accelerator.split_batches, put_on_device=True, rng_types=accelerator.rng_types.copy(),
                dispatch_batches=False, even_batches=accelerator.even_batches,
                use_seedable_sampler=accelerator.use_seedable_sampler, data_seed=accelerator.dataloader_config.data_seed,
            )
            accelerator._dataloaders.append(prepared)
            return prepared

        accelerator.prepare_data_loader = prepare_by_dp

    def visualize_schedule(self, filename: str) -> str:
        """Deprecated name of :meth:`visualize_current_schedule`."""
        warn_deprecated("PipelineTrainer.visualize_schedule", "PipelineTrainer.visualize_current_schedule")
        return self.visualize_current_schedule(filename)

    def visualize_current_schedule(self, filename: str) -> str:
        """Draw the pipeline schedule this trainer runs (ranks x time) as a PNG; any rank may call it."""
        from .visualize import draw_schedule, schedule_ops

        args = self.args
        if self._pp is None:
            raise PipelineConfigError("There is no pipeline schedule to draw: pp_size is 1.")
        per_rank = len(self._pp.stage_ids)
        ops = schedule_ops(args.pp_schedule, args.pp_size, args.pp_num_microbatches, per_rank, args.pp_schedule_csv)
        title = f"{args.pp_schedule_csv or args.pp_schedule}: pp={args.pp_size}, {args.pp_num_microbatches} microbatches"
        return draw_schedule(ops, filename, title=title)

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """Under pipelining each rank places only its own stages (the whole model may not fit, or be on meta)."""
        if getattr(self.args, "pp_size", 1) > 1:
            return
        super()._move_model_to_device(model, device)

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Replaces Trainer's DDP/FSDP wrapping: the stages are already placed and split."""
        if self._pp is None:
            return super()._wrap_model(model, training, dataloader)
        return self._pp_handle
