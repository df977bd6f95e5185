"""Pre-flight checks: pure functions of (model, arguments, data) that every rank runs the same way.

They run before any collective, so a bad setting raises the same
:class:`PipelineConfigError` on every rank instead of one rank failing and the
others hanging in a collective. :func:`hf_pp.trainer_batches.check_batch` repeats the data checks on
every batch.

Example::

    validate_pipeline_setup(model, args, {"train_dataset": ds}, world_size=2)  # raises or returns None
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import torch.nn as nn

from .architectures import is_sequence_classifier, max_positions, model_text_config, num_decoder_layers
from .activation_checkpointing import check_activation_checkpointing
from .balance import check_balance_options
from .compile import check_compile_options
from .errors import PipelineConfigError
from .functional import plan_stage_fqns
from .mesh import validate_pp_size
from .parallelize import check_parallelize_fn_signature
from .peft_utils import unwrap_peft
from .schedules import ScheduleSpec, resolve_schedule, validate_microbatches

__all__ = [
    "validate_pipeline_setup", "check_trainer_sees_every_process", "check_parallelize_fn", "check_train_dataset", "max_positions",
    "check_model_weights", "check_router_aux_loss", "check_save_on_each_node",
]


def validate_pipeline_setup(model: nn.Module | None, args, trainer_kwargs: dict, parallelize_fn: Callable | None = None,
                            world_size: int | None = None,
                            module_fqns_per_model_part: Sequence[Sequence[str]] | None = None) -> None:
    """Every check PipelineTrainer can make without communicating (configuration, model, data).

    ``module_fqns_per_model_part`` is PipelineTrainer's explicit stage plan (None: the model's own).

    Example::

        validate_pipeline_setup(tiny_llama(), args, {}, world_size=2)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    validate_pp_size(args.pp_size, world_size)
    if model is None:
        raise PipelineConfigError("PipelineTrainer needs `model` (a model or a model directory) or `model_init`.")
    if trainer_kwargs.get("optimizers", (None, None))[0] is not None:
        raise PipelineConfigError(
            "An optimizer built before the split holds the whole model's parameters. With pp_size > 1 pass "
            "optimizer_cls_and_kwargs=(cls, kwargs) or args.optim instead, so each rank optimizes its stages."
        )
    inner = unwrap_peft(model)
    check_sequence_classifier(inner, args)
    check_balance_options(args.pp_balance, module_fqns_per_model_part, args.pp_balance_seq_len)
    explicit = module_fqns_per_model_part is not None
    if getattr(inner, "config", None) is not None and args.pp_layers_per_stage is None and not explicit:
        layers = num_decoder_layers(inner)
        if args.pp_size > layers:
            raise PipelineConfigError(
                f"pp_size={args.pp_size} is larger than the model's {layers} layers; use pp_size <= {layers}."
            )
    spec = resolve_schedule(args.pp_schedule, args.pp_schedule_csv)
    # The whole stage layout is pure arithmetic on the model: check it here, on every rank.
    try:
        _, ranks = plan_stage_fqns(
            inner, args.pp_size, spec, layers_per_stage=args.pp_layers_per_stage,
            module_fqns_per_model_part=module_fqns_per_model_part,
            round_to_pp_multiple=args.pp_round_virtual_stages, csv_path=args.pp_schedule_csv,
        )
        validate_microbatches(spec, args.per_device_train_batch_size, args.pp_microbatch_size, args.pp_size,
                              len(ranks[0]))
    except PipelineConfigError as exc:
        message = in_training_argument_terms(str(exc))
        if explicit or "module_fqns_per_model_part" not in message:
            raise PipelineConfigError(message) from None
        raise PipelineConfigError(f"{message} {TRAINER_PLAN_HINT}") from None
    check_router_aux_loss(inner, args, trainer_kwargs)  # after the plan: the model is one hf_pp can split
    if args.torch_compile:
        check_compile_options(args.torch_compile_backend, args.torch_compile_mode)
    if args.activation_checkpointing:  # gradient_checkpointing (the older name) sets it too
        check_activation_checkpointing(inner, args.activation_checkpointing_kwargs, spec.splits_backward, spec.name)
    check_parallelize_fn(parallelize_fn, spec)
    dataset = trainer_kwargs.get("train_dataset")
    if dataset is not None:
        check_train_dataset(dataset, args, world_size // args.pp_size, max_positions(inner),
                            per_token_labels=not is_sequence_classifier(inner))
    check_save_on_each_node(args, world_size)
    # Last: the configuration errors above say more, and tests can reach them without a real launch.
    check_trainer_sees_every_process(args, world_size)


# The functional API's keywords and the TrainingArguments fields a trainer user sets for them.
_TRAINING_ARGUMENT_NAMES = {
    "round_to_pp_multiple": "pp_round_virtual_stages", "layers_per_stage": "pp_layers_per_stage",
    "local batch size": "per_device_train_batch_size", "local batch": "per_device_train_batch_size",
    "microbatch size": "pp_microbatch_size", "microbatch": "pp_microbatch_size",
}
# Longest first, so that "local batch size" is renamed before "local batch".
_FUNCTIONAL_NAMES = re.compile(r"(?<!\w)(%s)(?!\w)" % "|".join(
    re.escape(name) for name in sorted(_TRAINING_ARGUMENT_NAMES, key=len, reverse=True)))


def in_training_argument_terms(message: str) -> str:
    """A functional-API error message, with its keywords renamed to the flags a trainer user passes.

    Example:
        >>> in_training_argument_terms("Choose layers_per_stage so that ..., or set round_to_pp_multiple='up'")
        "Choose pp_layers_per_stage so that ..., or set pp_round_virtual_stages='up'"
        >>> in_training_argument_terms("local batch 6 / microbatch 4 gives 1")
        'per_device_train_batch_size 6 / pp_microbatch_size 4 gives 1'
    """
    return _FUNCTIONAL_NAMES.sub(lambda match: _TRAINING_ARGUMENT_NAMES[match.group(1)], message)


# Said after "pass module_fqns_per_model_part" when the model has no split hf_pp knows.
TRAINER_PLAN_HINT = (
    "With PipelineTrainer, give the plan as PipelineTrainer(..., module_fqns_per_model_part=[[...], [...]]): one "
    "list of module FQNs per stage, pp_size x stages-per-rank lists in forward order (e.g. [['embed', 'layers.0'], "
    "['layers.1', 'head']] for pp_size=2 with 1f1b), with pp_balance='layers'. Each stage runs the model's own "
    "forward with the other stages' modules set to None, so it must take and return tensors; for a Hugging Face "
    "model also set pp_patch_inner_model=False and pp_patch_causal_lm_model=False."
)


def check_sequence_classifier(model: nn.Module, args) -> None:
    """A ``*ForSequenceClassification`` without a pad token can only read batches of one (as Hugging Face says)."""
    if not is_sequence_classifier(model):
        return
    config = model.config.get_text_config()
    batches = {args.per_device_train_batch_size, args.per_device_eval_batch_size}
    if getattr(config, "pad_token_id", None) is None and max(batches) > 1:
        raise PipelineConfigError(
            f"{type(model).__name__} has no pad_token_id, so it cannot find each row's last token in batches of "
            f"{max(batches)}; set model.config.pad_token_id (e.g. to tokenizer.pad_token_id) or use batches of 1."
        )


# Where a *ForCausalLM keeps the coefficient its forward multiplies the router loss by (JetMoE: aux_loss_coef).
_ROUTER_LOSS_COEFFICIENTS = ("router_aux_loss_coef", "aux_loss_coef")


def router_aux_loss_coef(model: nn.Module) -> tuple[str, float] | None:
    """``(attribute, value)`` of the coefficient the model's own forward adds its router loss with, or None.

    The forward reads the attribute its ``__init__`` copied from the config, not the config. In transformers
    5.24 the causal LMs that add the loss, and only they, set one: classifier heads and the MoE models whose
    forward ignores the router logits (DeepSeek-V3, GLM-4-MoE, ...) have none.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> router_aux_loss_coef(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8,
        ...     intermediate_size=8, num_attention_heads=2, vocab_size=16))) is None
        True
    """
    for name in _ROUTER_LOSS_COEFFICIENTS:
        value = getattr(model, name, None)
        if isinstance(value, (int, float)):
            return name, float(value)
    return None


def check_router_aux_loss(model: nn.Module, args, trainer_kwargs: dict) -> None:
    """Refuse a mixture-of-experts model whose router load-balancing loss Trainer would train on.

    Trainer passes the labels to the model, whose forward adds ``coef * aux_loss`` when
    ``config.output_router_logits`` is set; the pipeline's last stage computes the loss from the logits alone,
    so that term would be dropped without a word. Refused exactly when Trainer would add a non-zero term.
    """
    found = router_aux_loss_coef(model)
    if found is None or found[1] == 0 or not getattr(model_text_config(model), "output_router_logits", False):
        return
    # With either, Trainer pops the labels and computes the loss itself: the model adds no router loss there either.
    if trainer_kwargs.get("compute_loss_func") is not None or args.label_smoothing_factor != 0:
        return
    # TRL's configs carry their own router_aux_loss_coef, which SFTTrainer writes into output_router_logits
    # after this check; PipelineSFTTrainer refuses the aux loss once TRL has settled it.
    if hasattr(args, "router_aux_loss_coef"):
        return
    name, coef = found
    raise PipelineConfigError(
        f"{type(model).__name__} has config.output_router_logits=True and {name}={coef:g}: Trainer would add "
        f"{name} x the router load-balancing loss to the loss, but under pipelining the last stage computes the "
        "loss from the logits alone, so that term would be silently dropped. Set "
        "model.config.output_router_logits=False (the routers still learn through the language-model loss), or "
        f"{name}=0 (in the config the model is built from, or model.{name}=0 on the built model, which its forward "
        "reads), or pp_size=1."
    )


def check_save_on_each_node(args, world_size: int, local_world_size: int | None = None) -> None:
    """Refuse ``save_on_each_node=True`` when the ranks span several nodes (``LOCAL_WORLD_SIZE < WORLD_SIZE``).

    It asks for the whole checkpoint on every node's own disk, but each node holds only its pipeline stages;
    and on a shared filesystem the local rank 0 of every node would publish and rotate the same
    ``checkpoint-N``. On one node local rank 0 is rank 0, so it is the same as False.
    ``local_world_size`` defaults to ``$LOCAL_WORLD_SIZE`` (set by torchrun).

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(save_on_each_node=True, pp_size=2)
        >>> check_save_on_each_node(args, 4, local_world_size=4)  # one node: fine
        >>> try:
        ...     check_save_on_each_node(args, 4, local_world_size=2)
        ... except PipelineConfigError as err:
        ...     print(str(err)[:73])
        save_on_each_node=True with pp_size=2 (LOCAL_WORLD_SIZE=2 < WORLD_SIZE=4:
    """
    if not getattr(args, "save_on_each_node", False) or world_size == 1:
        return
    if local_world_size is None and os.environ.get("LOCAL_WORLD_SIZE") is not None:
        local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    if local_world_size is not None and local_world_size >= world_size:
        return
    where = (f"LOCAL_WORLD_SIZE={local_world_size} < WORLD_SIZE={world_size}: the ranks span several nodes"
             if local_world_size is not None
             else f"LOCAL_WORLD_SIZE is not set (torchrun sets it), so the {world_size} ranks may span several nodes")
    raise PipelineConfigError(
        f"save_on_each_node=True with pp_size={args.pp_size} ({where}) cannot give each node a whole checkpoint: "
        "a node holds only its own pipeline stages, and on a shared filesystem every node would publish and rotate "
        "the same checkpoint-N. Set save_on_each_node=False: rank 0 publishes each checkpoint, which every rank "
        "writes its stages into, so output_dir must be on a filesystem all nodes share."
    )


def check_trainer_sees_every_process(args, world_size: int) -> None:
    """Refuse a launch of several processes that the Trainer does not run as one distributed job.

    On a machine without GPUs, ``TrainingArguments`` without ``use_cpu=True``
    stays non-distributed under torchrun: every rank would believe it is
    process 0 (all log, all write the same checkpoint files).
    """
    if world_size > 1 and args.world_size != world_size:
        raise PipelineConfigError(
            f"{world_size} processes were launched, but TrainingArguments runs {args.world_size} "
            f"(parallel_mode {args.parallel_mode.value}), so every rank would act as process 0. On CPU set "
            "use_cpu=True (--use_cpu true) so the Trainer runs distributed over gloo; on GPUs launch with torchrun "
            "(or accelerate launch) so each process gets its LOCAL_RANK."
        )


def check_parallelize_fn(parallelize_fn: Callable | None, spec: ScheduleSpec) -> None:
    """Refuse a ``parallelize_fn`` of the wrong signature, and FSDP ``reshard_after_forward=True``
    with a split-backward schedule (it gives wrong gradients); see also
    :func:`hf_pp.parallelize.check_parts_for_schedule`, which reads FSDP's own state after the split.

    Example:
        >>> from hf_pp.parallelize import fsdp_parallelize_fn
        >>> check_parallelize_fn(fsdp_parallelize_fn(), resolve_schedule("zbv_zero_bubble"))  # fine
    """
    check_parallelize_fn_signature(parallelize_fn)
    if getattr(parallelize_fn, "reshard_after_forward", False) and spec.splits_backward:
        raise PipelineConfigError(
            f"FSDP reshard_after_forward=True with the split-backward schedule {spec.name} gives wrong gradients; "
            "use fsdp_parallelize_fn(reshard_after_forward=False) or a schedule such as 1f1b or interleaved_1f1b."
        )


def check_train_dataset(dataset: Any, args, dp_size: int, limit: int | None, per_token_labels: bool = True) -> None:
    """Batch count and the first sample (map-style datasets only; others are checked batch by batch)."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return
    size, batch = len(dataset), args.per_device_train_batch_size
    if size == 0:
        raise PipelineConfigError("train_dataset is empty; give it at least one sample.")
    if args.dataloader_drop_last and size < batch * dp_size:
        raise PipelineConfigError(
            f"train_dataset has {size} samples, fewer than one batch ({batch} x {dp_size} data-parallel replicas) "
            "and dataloader_drop_last=True drops it: there is nothing to train on. Lower the batch size or add data."
        )
    first = dataset[0]
    if not isinstance(first, dict):
        return
    ids, labels = first.get("input_ids"), first.get("labels")
    if limit is not None and ids is not None and len(ids) > limit:
        raise PipelineConfigError(
            f"train_dataset[0] has {len(ids)} tokens, more than the model's max_position_embeddings={limit}; "
            "truncate the samples (e.g. tokenizer(..., truncation=True, max_length=...))."
        )
    if per_token_labels and ids is not None and labels is not None and hasattr(labels, "__len__") and len(labels) != len(ids):
        raise PipelineConfigError(
            f"train_dataset[0] has {len(ids)} input_ids but {len(labels)} labels; labels must have one entry per "
            "token (-100 where no loss is wanted)."
        )


def check_model_weights(model: nn.Module | None, device, weights_dir=None) -> None:
    """The weights can be trained on ``device`` and, when read per stage, the checkpoint has every one
    (directly or through transformers' conversion rules, e.g. per-expert tensors).

    Reads only the checkpoint's index; names the tensors that are missing.
    """
    if model is None:
        return
    from .materialize import check_dtype_runs, missing_checkpoint_tensors
    from .safetensors_reader import CheckpointIndex

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype in sorted(dtypes, key=str):
        check_dtype_runs(dtype, device)
    if weights_dir is not None:
        index = CheckpointIndex(weights_dir) if isinstance(weights_dir, (str, os.PathLike)) else weights_dir
        missing = missing_checkpoint_tensors(model, index)
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise PipelineConfigError(
                f"{index.directory!r} lacks tensors the pipeline stages need: {missing[:10]}{more}. Was it saved from "
                f"this model class and config ({type(model).__name__})?"
            )
