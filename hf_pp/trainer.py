"""``PipelineTrainer``: ``transformers.Trainer`` with the model split into pipeline stages."""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.data_loader import prepare_data_loader
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR, SaveStrategy, enable_full_determinism, rotate_checkpoints, set_seed,
)

from .errors import PipelineConfigError
from .balance import balanced_module_fqns, first_batch_seq_len
from .compile import compile_stage_layers
from .checkpoint import (
    load_optimizer_state_by_fqn, load_stage_weights, merged_optimizer_state, missing_checkpoint_files, optimizer_file,
    optimizer_state_by_fqn, publish_checkpoint, save_pipeline_model, staging_dir,
)
from .evaluation import broadcast_last_stage_output, forward_only_schedule, gather_over_group
from .architectures import is_sequence_classifier, is_token_classifier
from .functional import make_pipeline_stages, pipeline_model, plan_stage_fqns
from .hf_patching import last_token_index
from .grads import tied_copies_to_skip
from .materialize import (
    auto_class_for, check_dtype_runs, has_meta_tensors, materialize_stage, meta_model_from_pretrained, resolve_dtype,
)
from .mesh import build_world_mesh
from .parallelize import ddp_parallelize_fn, fsdp_parallelize_fn
from .preflight import (
    check_batch, check_model_weights, max_positions, validate_pipeline_setup,
)
from .reliability import (
    agree_before_start, check_loss_finite, config_fingerprint, mask_even_batches_padding, release_at_exit,
    report_rank_failures,
)
from .peft_utils import (
    active_adapter_name, adapter_subdir, check_adapters_can_initialize, check_peft_config_can_initialize,
    check_peft_model_can_split, is_peft_model, load_pipeline_adapter,
    make_adapter_initializer, save_pipeline_adapter, unwrap_peft,
)
from .runtime import PipelineRuntime, PipelineStagesModule, _ScheduleHandle
from .schedules import resolve_schedule
from .split import tied_parameter_groups
from .tied import make_tied_gradient_sync, pipelines_of_mesh

__all__ = ["PipelineTrainer"]

# Batch keys handed to every stage; everything else except labels is dropped.
_STAGE_KWARGS = ("attention_mask", "position_ids", "last_token_index")


class PipelineTrainer(Trainer):
    """A ``transformers.Trainer`` that trains the model split over ``args.pp_size`` pipeline ranks.

    Takes every ``Trainer`` argument plus ``parallelize_fn`` (applied to every
    stage module, see :func:`hf_pp.functional.pipeline_model`) and
    ``module_fqns_per_model_part`` (an explicit stage plan, for models hf_pp has
    no split for; with ``pp_balance="layers"``). With
    ``pp_size=1`` it is exactly ``Trainer``. With ``pp_size > 1`` (launch with
    ``torchrun --nproc-per-node N``, N a multiple of pp_size) each rank holds only
    its stages; the loop, logging, callbacks, schedulers and gradient
    accumulation are the Trainer's own, and the numbers match it. The model is
    a decoder ``*ForCausalLM``, ``*ForSequenceClassification`` or
    ``*ForTokenClassification`` (or comes from ``model_init``, called again at
    every ``train()`` as Trainer calls it).

    Example::

        args = PipelineTrainingArguments(output_dir="out", pp_size=2, per_device_train_batch_size=8,
                                         use_cpu=not torch.cuda.is_available())
        trainer = PipelineTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
        trainer.train()

    Models too large for one process: pass ``model`` as a local
    ``save_pretrained`` directory (each rank builds the model on the meta
    device and reads only its stages' tensors, in ``args.pp_load_dtype``), or a
    model built on the meta device (each stage initialised fresh, as
    ``from_config`` would). ``peft_config`` (e.g. a ``LoraConfig``) is applied
    with ``peft.get_peft_model`` before the split, so adapters follow their
    layers; with a directory, the adapters are initialised after the base
    weights are read::

        trainer = PipelineTrainer(model="path/to/llama", args=args, peft_config=LoraConfig(r=8),
                                  train_dataset=ds, data_collator=collator)

    Any other ``nn.Module`` (or a Hugging Face model without a pipeline plan):
    name the modules of each stage, in forward order, one list per stage. Each
    stage calls the model's own forward with the other stages' modules set to
    None, so it must take and return tensors; the loss comes from
    ``compute_loss_func(logits, labels, num_items_in_batch=...)``::

        trainer = PipelineTrainer(model=my_model, args=args, compute_loss_func=loss,
                                  module_fqns_per_model_part=[["embed", "layers.0"], ["layers.1", "head"]], ...)
    """

    def __init__(self, model: nn.Module | str | None = None, args=None, *trainer_args: Any,
                 parallelize_fn: Callable | None = None, peft_config: Any = None,
                 module_fqns_per_model_part: Sequence[Sequence[str]] | None = None, **trainer_kwargs: Any):
        self._pp: PipelineRuntime | None = None
        self._pp_module_fqns = [list(f) for f in module_fqns_per_model_part] if module_fqns_per_model_part else None
        self._peft_model = None
        self._pp_parallelize_fn, self._pp_peft_config = parallelize_fn, peft_config
        pp_size = getattr(args, "pp_size", 1)
        model_init = trainer_kwargs.pop("model_init", None) if pp_size > 1 else None
        if model_init is not None:
            model = self._first_model_from_init(model, model_init, args)
        model, self._pp_weights_dir = _resolve_model(model, args, peft_config)
        if pp_size > 1:
            _preflight(model, args, trainer_kwargs, parallelize_fn, self._pp_weights_dir, self._pp_module_fqns)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if model_init is not None:
            self.model_init = model_init  # kept from Trainer, so that train() re-creates the model as Trainer does
        if pp_size > 1:
            self._pp = self._build_pipeline(parallelize_fn)

    # ---- setup -------------------------------------------------------------
    def _first_model_from_init(self, model: Any, model_init: Callable, args) -> Any:
        """The model ``model_init`` builds, seeded as Trainer seeds it; the split needs it before Trainer starts."""
        if model is not None:
            raise PipelineConfigError("Pass either `model` or `model_init` to PipelineTrainer, not both.")
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self.model_init = model_init
        return Trainer.call_model_init(self)

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
        model, weights_dir = _resolve_model(model, self.args, self._pp_peft_config)
        _preflight(model, self.args, {"train_dataset": self.train_dataset}, self._pp_parallelize_fn, weights_dir,
                   self._pp_module_fqns)
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
        self._peft_model = self.model if is_peft_model(self.model) else None
        model = unwrap_peft(self.model)
        mesh = build_world_mesh(args.pp_size, device_type=args.device.type)
        dp_size = mesh["dp"].size()
        tied = tied_parameter_groups(model)
        config = getattr(model, "config", None)
        loss_function = getattr(model, "loss_function", None)
        vocab = getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", None)
        holder: dict[str, Any] = {"num_items": None, "scale": 1, "samples": None, "batch_items": None}
        # Trainer's rule: the label smoother shifts labels for the causal-LM classes.
        smoother_shifts = model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._pp_pooled = is_sequence_classifier(model)
        token_classifier = is_token_classifier(model)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # Normalised by the items of the whole optimizer step (all microbatches,
            # accumulation steps and, when averaging across devices, DP ranks).
            if self.compute_loss_func is not None:
                loss = self.compute_loss_func(logits, labels, num_items_in_batch=holder["num_items"])
            elif self.label_smoother is not None:  # label_smoothing_factor, applied as Trainer applies it
                loss = self.label_smoother({"logits": logits}, labels, shift_labels=smoother_shifts,
                                           num_items_in_batch=holder["num_items"])
            elif self._pp_pooled:
                # The model's loss is a mean over the rows it gets, and ignores num_items_in_batch (Trainer does not
                # divide it by the accumulation steps either): weigh each microbatch by its share of the batch.
                loss = loss_function(labels=labels, pooled_logits=logits, config=config)
                loss = loss * (labels.shape[0] / holder["samples"])
            elif token_classifier:
                # The model's loss is a mean over the label tokens of the batch it gets (Trainer's num_items_in_batch
                # does not reach it): sum over this microbatch, divided by the label tokens of this batch.
                loss = loss_function(logits, labels, config, num_items_in_batch=holder["batch_items"])
            else:
                loss = loss_function(logits, labels, vocab, num_items_in_batch=holder["num_items"])
            return loss * holder["scale"]

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
            tied_groups=tied, loss_state=holder,
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
        self.model = self.model_wrapped = PipelineStagesModule(parts, config, getattr(model, "generation_config", None))
        self._pp_handle = _ScheduleHandle(self.model)
        release_at_exit(self)
        self._shard_data_by_dp_rank(mesh["dp"].get_local_rank(), dp_size)
        return runtime

    def _balanced_plan(self, model: nn.Module) -> list[list[str]] | None:
        """The stage plan ``args.pp_balance`` asks for, computed once (None: layers spread evenly).

        An explicit ``module_fqns_per_model_part`` is the plan as given (preflight
        refused it with any pp_balance but "layers"). "time" profiles microbatches
        of ``pp_microbatch_size`` x ``pp_balance_seq_len`` tokens (default: the
        first collated training batch's length), a collective on every rank.
        """
        if self._pp_module_fqns is not None:
            return self._pp_module_fqns
        args = self.args
        seq_len = args.pp_balance_seq_len
        if args.pp_balance == "time" and seq_len is None:
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
        """Draw the pipeline schedule this trainer runs (ranks x time) as a PNG; any rank may call it."""
        from .visualize import draw_schedule, schedule_ops

        args = self.args
        if self._pp is None:
            raise PipelineConfigError("There is no pipeline schedule to draw: pp_size is 1.")
        per_rank = len(self._pp.stage_ids)
        ops = schedule_ops(args.pp_schedule, args.pp_size, args.pp_num_microbatches, per_rank, args.pp_schedule_csv)
        title = f"{args.pp_schedule_csv or args.pp_schedule}: pp={args.pp_size}, {args.pp_num_microbatches} microbatches"
        return draw_schedule(ops, filename, title=title)

    # ---- Trainer overrides -------------------------------------------------
    def train(self, *args, **kwargs):
        """Trainer's ``train``; under pipelining a rank that fails is named on every other rank.

        See :func:`hf_pp.reliability.report_rank_failures`.
        """
        if self._pp is None:
            return super().train(*args, **kwargs)
        with report_rank_failures(lambda: self.state.global_step + 1):
            return super().train(*args, **kwargs)

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

    def get_total_train_batch_size(self, args) -> int:
        """Trainer counts every rank as a data-parallel replica; a pipeline is one replica."""
        if self._pp is None:
            return super().get_total_train_batch_size(args)
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self._pp.dp_size

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Label tokens of the whole optimizer step, summed over DP ranks only (not pipeline ranks)."""
        if self._pp is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        if not batch_samples or "labels" not in batch_samples[0]:
            raise PipelineConfigError("Pipeline training needs 'labels' in every batch (the last stage computes the loss).")
        state = self.accelerator.gradient_state
        if self._pp.dp_size > 1 and state.end_of_dataloader and state.remainder > 0:
            # even_batches filled the epoch's last batch with repeats: count every sample once.
            mask_even_batches_padding(batch_samples[-1], self._pp.dp_rank, state.remainder)
        shift = self._loss_shifts_labels
        count = sum((b["labels"][..., 1:] if shift else b["labels"]).ne(-100).sum() for b in batch_samples)
        count = count.to(device)
        if self.args.average_tokens_across_devices and self._pp.dp_size > 1:
            dist.all_reduce(count, group=self._pp.dp_group)
        return count

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Replaces forward + backward with one schedule step over this batch's microbatches.

        Returns the true loss (from the last stage) on every rank, already
        normalised for gradient accumulation like Trainer's.
        """
        if self._pp is None:
            return super().training_step(model, inputs, num_items_in_batch)
        pp = self._pp
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([inputs], labels.device)
        averaging = self.args.average_tokens_across_devices and pp.dp_size > 1
        pp.loss_state.update(num_items=num_items_in_batch, scale=pp.dp_size if averaging else 1,
                             samples=labels.shape[0], batch_items=labels.ne(-100).sum())
        inputs = self._pad_to_dp_length(self._with_last_token_index(inputs))
        check_batch(inputs, microbatch_size=pp.microbatch_size, limit=max_positions(self.model),
                    per_token_labels=not self._pp_pooled)
        loss = self._run_schedule(inputs, training=True)
        check_loss_finite(loss, step=self.state.global_step + 1, pp=pp,
                          raise_error=getattr(self.args, "pp_raise_on_nan_inf", False))
        if self.accelerator.sync_gradients:
            pp.finish_gradients()
        return loss

    def _pad_to_dp_length(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Right-pad the batch to the longest sequence of all DP replicas.

        Replicas that see a new length re-run the stages' shape inference (a
        forward); under FSDP that forward's all-gathers would pair with another
        replica's reduce-scatters and deadlock. One shape for all replicas keeps
        their collectives in step. Safe for causal LMs: pads come after every
        real token, carry attention_mask 0 and label -100.
        """
        pp = self._pp
        if pp.dp_size == 1:
            return inputs
        length = torch.tensor(inputs["input_ids"].shape[1], device=pp.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=pp.dp_group)
        extra = int(length) - inputs["input_ids"].shape[1]
        if extra == 0:
            return inputs
        pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        fill = {"input_ids": pad_id, "attention_mask": 0}
        if not self._pp_pooled:  # a classifier's labels are one per row, not per token
            fill["labels"] = -100
        padded = dict(inputs)
        for key, value in fill.items():
            if torch.is_tensor(inputs.get(key)):
                padded[key] = torch.nn.functional.pad(inputs[key], (0, extra), value=value)
        if torch.is_tensor(inputs.get("position_ids")):
            last = inputs["position_ids"][:, -1:]
            steps = torch.arange(1, extra + 1, device=last.device)
            padded["position_ids"] = torch.cat([inputs["position_ids"], last + steps], dim=1)
        return padded

    def _with_last_token_index(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """For a sequence classifier: the position each row is read at, taken before any DP padding."""
        ids = inputs.get("input_ids")
        if not self._pp_pooled or not torch.is_tensor(ids) or ids.dim() != 2:  # check_batch names a bad batch
            return inputs
        pad_token_id = getattr(self.model.config.get_text_config(), "pad_token_id", None)
        return {**inputs, "last_token_index": last_token_index(inputs["input_ids"], pad_token_id)}

    def _run_schedule(self, inputs: dict[str, Any], *, training: bool) -> torch.Tensor:
        pp = self._pp
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        batch, seq = input_ids.shape[:2]
        schedule = pp.schedule_for(batch, seq, training=training)
        kwargs = {k: inputs[k] for k in _STAGE_KWARGS if inputs.get(k) is not None}
        losses: list[torch.Tensor] = []
        args = (input_ids,) if pp.has_first else ()
        target = labels if pp.has_last else None
        # Trainer gets bf16 autocast from accelerate wrapping model.forward; the stages
        # are never wrapped, so the whole schedule step runs under the same autocast.
        with self.accelerator.autocast():
            if training:
                pp.step_keeping_grads(schedule, *args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, target=target, losses=losses, **kwargs)
        local = torch.stack(losses).sum() if pp.has_last else torch.zeros((), device=pp.device)
        return pp.share_last_stage_value(local.float())

    def _clip_grad_norm(self, model):
        """Clip over all stages of the pipeline (Trainer clips one process's parameters)."""
        if self._pp is None:
            return super()._clip_grad_norm(model)
        return self._pp.clip_grad_norm(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._pp is None:
            return super()._get_grad_norm(model, grad_norm)
        return (grad_norm if grad_norm is not None else self._pp.grad_norm()).item()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Replaces Trainer's forward with a forward-only pass through the stages (any schedule, ZBV included).

        The loss is Trainer's (label tokens of this batch); with
        ``prediction_loss_only=False`` the last stage's logits are sent to every
        pipeline rank and returned with the labels, as Trainer returns them.
        """
        if self._pp is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        pp = self._pp
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"] if has_labels and "labels" in inputs else None
        if labels is not None:
            # Trainer's evaluation loss: over the label tokens of this batch on all replicas, then scaled by their
            # number (the replicas' losses are averaged later), as in training.
            items = (labels[..., 1:] if self._loss_shifts_labels else labels).ne(-100).sum()
            averaging = self.args.average_tokens_across_devices and pp.dp_size > 1
            if averaging:
                dist.all_reduce(items, group=pp.dp_group)
            pp.loss_state.update(num_items=items, scale=pp.dp_size if averaging else 1, samples=labels.shape[0],
                                 batch_items=labels.ne(-100).sum())
        length = inputs["input_ids"].shape[1]
        # Replicas run one shape: FSDP collectives stay paired.
        padded = self._pad_to_dp_length(self._with_last_token_index(inputs))
        with torch.no_grad():
            loss, logits = self._pp_forward_only(padded, padded.get("labels") if labels is not None else None,
                                                 want_logits=not prediction_loss_only)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits if self._pp_pooled else logits[:, :length], labels

    # ---- evaluation helpers ------------------------------------------------
    def _pp_forward_only(self, inputs: dict[str, Any], labels: torch.Tensor | None, *, want_logits: bool):
        """(loss or None, logits or None), the same on every pipeline rank."""
        pp = self._pp
        input_ids = inputs["input_ids"]
        schedule = self._pp_eval_schedule(*input_ids.shape[:2], with_loss=labels is not None)
        kwargs = {k: inputs[k] for k in _STAGE_KWARGS if inputs.get(k) is not None}
        losses: list[torch.Tensor] | None = [] if labels is not None else None
        args = (input_ids,) if pp.has_first else ()
        target = labels if pp.has_last and labels is not None else None
        output = schedule.eval(*args, target=target, losses=losses, return_outputs=want_logits, **kwargs)
        loss = logits = None
        if labels is not None:
            local = torch.stack(losses).sum() if pp.has_last else torch.zeros((), device=pp.device)
            loss = pp.share_last_stage_value(local.float())
        if want_logits:
            _, last_rank = self._pp_eval_layout()
            logits = broadcast_last_stage_output(output if pp.has_last else None, last_rank, pp.pp_group, pp.device)
        return loss, logits

    def _pp_eval_layout(self) -> tuple[list[list[int]], int]:
        """(stage ids of every pipeline rank, global rank holding the last stage), gathered once."""
        if getattr(self, "_pp_layout", None) is None:
            pp = self._pp
            layout: list = [None] * dist.get_world_size(pp.pp_group)
            dist.all_gather_object(layout, (list(pp.stage_ids), pp.has_last), group=pp.pp_group)
            last = next(r for r, (_, has_last) in enumerate(layout) if has_last)
            self._pp_layout = ([ids for ids, _ in layout], dist.get_global_rank(pp.pp_group, last))
        return self._pp_layout

    def _pp_eval_schedule(self, batch: int, seq: int, *, with_loss: bool):
        """A forward-only schedule for this input shape, built once (torch fixes shapes per stage)."""
        schedules = self.__dict__.setdefault("_pp_eval_schedules", {})
        key = (batch, seq, with_loss)
        if key not in schedules:
            pp = self._pp
            # Equal microbatches (fixed P2P buffers): the most, of at least pp_microbatch_size samples, dividing the batch.
            n = next(k for k in range(max(1, batch // pp.microbatch_size), 0, -1) if batch % k == 0)
            stages = make_pipeline_stages(pp.parts, pp.stage_ids, pp.num_stages, pp.device, pp.pp_mesh)
            stage_ids_by_rank, _ = self._pp_eval_layout()
            schedules[key] = forward_only_schedule(stages, stage_ids_by_rank, n, pp.loss_fn if with_loss else None)
        return schedules[key]

    def _pp_gather_for_metrics(self, data):
        """Trainer's ``gather_for_metrics`` over data-parallel replicas only (a pipeline's ranks share a batch)."""
        if isinstance(data, (tuple, list)):
            return type(data)(self._pp_gather_for_metrics(d) for d in data)
        state = self.accelerator.gradient_state
        keep = state.remainder if state.end_of_dataloader and state.remainder > 0 else None
        return gather_over_group(data, self._pp.dp_group, keep)

    def evaluation_loop(self, *args, **kwargs):
        """Trainer's loop; under pipelining it gathers predictions over DP replicas, not every rank."""
        if self._pp is not None:
            self.gather_function = self._pp_gather_for_metrics  # Trainer resets it at the end of the loop
        return super().evaluation_loop(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes one Hugging Face model directory from all stages (each pipeline rank writes its own shard).

        Replaces Trainer's single-process ``save_pretrained``; every rank must call it.
        """
        if self._pp is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if os.path.isfile(output_dir):
            raise PipelineConfigError(f"save_model: {output_dir!r} is a file; pass a directory to write the model into.")
        pp = self._pp
        if self._peft_model is not None:
            save_pipeline_adapter(output_dir, self._peft_model, pp.parts, pp.pp_group, write=pp.dp_rank == 0)
        else:
            save_pipeline_model(
                output_dir, pp.parts, pp.pp_group, config=self.model.config,
                generation_config=self.model.generation_config, drop=tied_copies_to_skip(pp.tied_groups),
                write=pp.dp_rank == 0,
            )
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Each rank reads only its stages' tensors (by FQN, so any pp_size or schedule) from the checkpoint.

        A missing shard or a checkpoint of another model raises the same
        :class:`PipelineConfigError` on every rank.
        """
        if self._pp is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._peft_model is not None:
            # A PEFT checkpoint holds the adapter only (as Trainer's does); the base weights are the model's.
            adapter_dir = adapter_subdir(resume_from_checkpoint, active_adapter_name(self._peft_model))
            adapter = os.path.join(adapter_dir, "adapter_model.safetensors")
            if not os.path.isfile(adapter):
                raise PipelineConfigError(f"{adapter} is missing: resume a PEFT run from a checkpoint of a PEFT run.")
            self._pp_on_every_rank(lambda: load_pipeline_adapter(self._peft_model, self._pp.parts, resume_from_checkpoint))
            return
        missing = missing_checkpoint_files(resume_from_checkpoint, optimizer=False)
        if missing:
            raise PipelineConfigError(
                f"Checkpoint {resume_from_checkpoint!r} is incomplete: {', '.join(missing)} missing. Resume from "
                "a complete checkpoint (one written to the end by every pipeline rank)."
            )
        self._pp_on_every_rank(lambda: load_stage_weights(self._pp.parts, resume_from_checkpoint, self._pp.tied_groups))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: every rank reloads its stages from the best checkpoint."""
        if self._pp is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _pp_on_every_rank(self, load: Callable[[], None]) -> None:
        """Run ``load`` on every rank; if it fails on any, raise its error on all (none is left waiting)."""
        error = None
        try:
            load()
        except (PipelineConfigError, FileNotFoundError) as exc:
            error = str(exc)
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = {rank: e for rank, e in enumerate(errors) if e}
        if failed:
            rank, first = next(iter(failed.items()))
            raise PipelineConfigError(f"Loading the checkpoint failed on ranks {sorted(failed)}; rank {rank}: {first}")

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written atomically: every rank writes into a hidden staging
        directory; once all are done, one rank renames it to ``checkpoint-N``.

        A crash mid-save leaves only the staging directory, which neither
        ``resume_from_checkpoint=True`` nor ``save_total_limit`` ever looks at.
        """
        if self._pp is None:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staged = staging_dir(final)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by an earlier crash
        dist.barrier()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staged, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staged)
            self._save_scaler(staged)
            self._save_rng_state(staged)
        best = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best:
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
            if best == self.state.global_step or os.path.exists(best_dir):
                self.state.best_model_checkpoint = best_dir
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        dist.barrier()  # every rank's files are in the staging directory
        if self.args.should_save:
            publish_checkpoint(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        dist.barrier()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Every pipeline rank saves its own stages' optimizer state, keyed by parameter FQN."""
        if self._pp is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        pp = self._pp
        os.makedirs(output_dir, exist_ok=True)
        state = optimizer_state_by_fqn(self.optimizer, self.model.original_named_parameters())  # every replica: FSDP gathers
        if pp.dp_rank == 0:
            torch.save(state, os.path.join(output_dir, optimizer_file(pp.pp_rank)))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Each rank takes its parameters' state, by FQN, from the state files of all pipeline ranks.

        So a checkpoint resumes under another ``pp_size`` or schedule too.
        """
        if self._pp is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        missing = missing_checkpoint_files(checkpoint, weights=False)
        if missing:
            raise PipelineConfigError(
                f"Checkpoint {checkpoint!r} has no {', '.join(missing)}: it was saved with save_only_model=True, "
                "not by a pipeline run, or not to the end. Resume from a complete checkpoint."
            )

        def load() -> None:
            saved = merged_optimizer_state(checkpoint, map_location="cpu")  # load_state_dict moves it to each parameter
            load_optimizer_state_by_fqn(self.optimizer, saved, self.model.original_named_parameters())

        self._pp_on_every_rank(load)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


def _resolve_model(model: nn.Module | str | None, args, peft_config: Any) -> tuple[nn.Module | None, str | None]:
    """``(model to hand to Trainer, directory to read stage weights from)``.

    A directory becomes a meta-device model when pipelining (its tensors are
    read per stage later) and a normal ``from_pretrained`` model otherwise; a
    meta-device model without pipelining is initialised whole. ``peft_config``
    wraps the result with ``peft.get_peft_model``.
    """
    pipelining = getattr(args, "pp_size", 1) > 1
    dtype = getattr(args, "pp_load_dtype", "auto")
    weights_dir = None
    if isinstance(model, (str, os.PathLike)):
        weights_dir = os.fspath(model)
        if pipelining:
            model = meta_model_from_pretrained(weights_dir, dtype=dtype)
        else:
            from transformers import AutoConfig

            model = auto_class_for(AutoConfig.from_pretrained(weights_dir, local_files_only=True)).from_pretrained(
                weights_dir, dtype=dtype if dtype == "auto" else resolve_dtype(dtype), local_files_only=True
            )
            weights_dir = None
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
    return model, weights_dir


def _preflight(model, args, trainer_kwargs: dict, parallelize_fn: Callable | None = None,
               weights_dir: str | None = None, module_fqns: list[list[str]] | None = None) -> None:
    """Pure checks on every rank (:mod:`hf_pp.preflight`), then one exchange: all ranks agree or all raise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.device  # noqa: B018 - Trainer would start the process group (with ddp_timeout) here anyway
    dataset = trainer_kwargs.get("train_dataset")
    fingerprint = config_fingerprint(
        args, unwrap_peft(model) if model is not None else None, world_size=os.environ.get("WORLD_SIZE", "1"),
        torch=torch.__version__, dataset_size=len(dataset) if hasattr(dataset, "__len__") else None,
        parallelize_fn=getattr(parallelize_fn, "__qualname__", None), module_fqns_per_model_part=module_fqns,
    )
    def checks() -> None:
        check_peft_model_can_split(model, module_fqns)  # first: names the PEFT problem before the stage checks
        validate_pipeline_setup(model, args, trainer_kwargs, parallelize_fn, module_fqns_per_model_part=module_fqns)
        check_model_weights(unwrap_peft(model), args.device, weights_dir)
        if is_peft_model(model) and has_meta_tensors(model):
            check_adapters_can_initialize(model, model.peft_config)

    agree_before_start(checks, fingerprint)
