"""``PipelineMixin``: the pipeline overrides for any ``transformers.Trainer`` subclass, and
``PipelineTrainer = PipelineMixin + Trainer``.

Each concern lives in its own module, every override next to the Trainer method it replaces:
:mod:`~hf_pp.trainer_build` (model, checks, split), :mod:`~hf_pp.trainer_batches` (a batch on its way to
the schedule), :mod:`~hf_pp.trainer_loss` (the last-stage loss hook and the training step),
:mod:`~hf_pp.trainer_evaluation`, :mod:`~hf_pp.trainer_checkpoint` and :mod:`~hf_pp.trainer_bookkeeping`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn
from transformers import Trainer

from .reliability import report_rank_failures
from .trainer_batches import BatchOverrides, check_collator_keeps_rows
from .trainer_bookkeeping import BookkeepingOverrides
from .trainer_build import BuildOverrides, preflight, resolve_model
from .trainer_checkpoint import CheckpointOverrides
from .trainer_evaluation import EvaluationOverrides
from .trainer_loss import LossOverrides, check_loss_is_pipelined

__all__ = ["PipelineMixin", "PipelineTrainer"]


class PipelineMixin(BuildOverrides, BatchOverrides, LossOverrides, EvaluationOverrides, CheckpointOverrides,
                    BookkeepingOverrides):
    """Pipeline parallelism for any ``transformers.Trainer`` subclass: put it first among the bases.

    ``class MyTrainer(PipelineMixin, SomeTrainer)`` trains ``SomeTrainer``'s way with the model split over
    ``args.pp_size`` pipeline ranks (``args`` a :class:`hf_pp.PipelineTrainingArguments`, or any
    ``TrainingArguments`` subclass composed with :class:`hf_pp.PipelineArguments`). The subclass's loss goes
    in :meth:`compute_pipeline_loss`, which runs on the last stage; a ``compute_loss`` override without it is
    refused before training. With ``pp_size=1`` the class is ``SomeTrainer`` unchanged.

    Example::

        from transformers import Trainer
        from hf_pp import PipelineMixin

        class DistillTrainer(PipelineMixin, Trainer):
            def compute_pipeline_loss(self, logits, labels, num_items_in_batch=None):
                return my_loss(logits, labels) ...

    Extra constructor arguments: ``parallelize_fn`` (applied to every stage module, see
    :func:`hf_pp.functional.pipeline_model`), ``peft_config`` (applied with ``peft.get_peft_model`` before
    the split), ``module_fqns_per_model_part`` (an explicit stage plan) and ``from_pretrained_kwargs``
    (``revision``, ``token``, ``cache_dir``, ``subfolder``, ... for a ``model`` given as a hub id or
    directory, as ``from_pretrained`` takes them). See :class:`PipelineTrainer`.
    """

    # Whether the Trainer subclass after this mixin takes peft_config itself (TRL's trainers do): without
    # pipelining it gets it unchanged; with pipelining hf_pp applies it before the split.
    _parent_takes_peft_config = False

    def __init__(self, model: nn.Module | str | None = None, args=None, *trainer_args: Any,
                 parallelize_fn: Callable | None = None, peft_config: Any = None,
                 module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
                 from_pretrained_kwargs: dict | None = None, **trainer_kwargs: Any):
        self._pp = None
        self._pp_module_fqns = [list(f) for f in module_fqns_per_model_part] if module_fqns_per_model_part else None
        self._peft_model = None
        self._pp_parallelize_fn, self._pp_peft_config = parallelize_fn, peft_config
        pp_size = getattr(args, "pp_size", 1)
        if pp_size > 1:
            check_loss_is_pipelined(type(self))
        model_init = trainer_kwargs.pop("model_init", None) if pp_size > 1 else None
        if model_init is not None:
            model = self._first_model_from_init(model, model_init, args)
        if pp_size == 1 and self._parent_takes_peft_config:
            trainer_kwargs["peft_config"], peft_config = peft_config, None  # the parent's own PEFT handling, unchanged
        model, self._pp_weights_dir = resolve_model(model, args, peft_config, from_pretrained_kwargs)
        if pp_size > 1:
            preflight(model, args, trainer_kwargs, parallelize_fn, self._pp_weights_dir, self._pp_module_fqns,
                      extra_checks=lambda: self._pipeline_checks(args, trainer_kwargs))
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if model_init is not None:
            self.model_init = model_init  # kept from Trainer, so that train() re-creates the model as Trainer does
        if pp_size > 1:
            self._pp = self._build_pipeline(parallelize_fn)

    def _pipeline_checks(self, args, trainer_kwargs: dict) -> None:
        """A trainer class's own pure checks, run with the pre-flight on every rank (override and wrap
        ``super()`` to add a library's options, as :class:`hf_pp.PipelineSFTTrainer` does)."""
        check_collator_keeps_rows(trainer_kwargs.get("data_collator"))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's ``train``; under pipelining a rank that fails is named on every other rank, and
        ``resume_from_checkpoint=True`` finds the same checkpoint on every rank (or names the ranks that differ).

        See :func:`hf_pp.reliability.report_rank_failures`.
        """
        if self._pp is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        resume_from_checkpoint = self._pp_resolve_resume(resume_from_checkpoint)
        with report_rank_failures(lambda: self.state.global_step + 1), self._pipeline_log_counts():
            return super().train(resume_from_checkpoint, *args, **kwargs)


class PipelineTrainer(PipelineMixin, Trainer):
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
    every ``train()`` as Trainer calls it). A custom loss goes in
    :meth:`compute_pipeline_loss` (it runs on the last stage); other Trainer
    subclasses get the same overrides from :class:`PipelineMixin`.

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
