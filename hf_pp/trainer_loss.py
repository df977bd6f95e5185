"""The loss where the logits are: a last-stage hook a Trainer subclass overrides, and the training step
that runs it through the schedule.

``Trainer.compute_loss`` calls the whole model; under pipelining no rank holds it, so the loss runs on the
last stage, per microbatch, as :meth:`LossOverrides.compute_pipeline_loss`. A subclass that customised
``compute_loss`` (weighting, distillation) moves that code into the hook; a subclass that overrides
``compute_loss`` but not the hook is refused before training (:func:`check_loss_is_pipelined`), never
silently trained with the default loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import PipelineConfigError
from .architectures import max_positions
from .reliability import check_loss_finite
from .trainer_batches import STAGE_KWARGS, check_batch, loss_target

__all__ = ["LossOverrides", "check_loss_is_pipelined"]


def _defining_class(cls: type, name: str) -> type | None:
    """The class of ``cls``'s MRO whose body defines ``name`` (the one an attribute lookup finds)."""
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def check_loss_is_pipelined(trainer_cls: type) -> None:
    """Refuse a trainer class whose ``compute_loss`` override the pipeline would never call.

    The override is honoured when ``compute_pipeline_loss`` is overridden in the same class or a subclass of
    it (the loss moved to the hook, or, as in ``PipelineSFTTrainer``, reproduced there).

    Example:
        >>> from transformers import Trainer
        >>> from hf_pp import PipelineTrainer
        >>> class Weighted(PipelineTrainer):
        ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ...         return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        >>> try:
        ...     check_loss_is_pipelined(Weighted)
        ... except PipelineConfigError as err:
        ...     print(str(err)[:57])
        Weighted overrides compute_loss, which pipelining never c
        >>> check_loss_is_pipelined(PipelineTrainer)
    """
    from transformers import Trainer

    loss_owner = _defining_class(trainer_cls, "compute_loss")
    if loss_owner is None or loss_owner is Trainer:
        return
    hook_owner = _defining_class(trainer_cls, "compute_pipeline_loss")
    mro = trainer_cls.__mro__
    if hook_owner is not LossOverrides and mro.index(hook_owner) <= mro.index(loss_owner):
        return
    raise PipelineConfigError(
        f"{loss_owner.__name__} overrides compute_loss, which pipelining never calls: no rank holds the whole "
        "model, so the loss runs on the last stage, per microbatch. Move the loss into "
        f"{trainer_cls.__name__}.compute_pipeline_loss(self, logits, labels, num_items_in_batch) (it gets this "
        "microbatch's logits and labels and returns its loss summed over its tokens and divided by "
        "num_items_in_batch, as compute_loss_func does), or pass compute_loss_func=...; otherwise set pp_size=1."
    )


class LossOverrides:
    """Trainer's training step and loss, run through the pipeline schedule (mixed into PipelineMixin)."""

    def compute_pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                              num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The loss of one microbatch on the last stage; override it for a custom loss.

        ``logits`` are the last stage's output for this microbatch (for a sequence classifier, one row per
        sample); ``labels`` its labels (``shift_labels`` when the batch carries them:
        :attr:`pipeline_labels_are_shifted` says which). ``num_items_in_batch`` counts the label tokens of the
        whole optimizer step (every microbatch, accumulation step and data-parallel replica), so losses
        summed over a microbatch's tokens and divided by it add up to Trainer's loss. hf_pp multiplies the
        result by the data-parallel size when Trainer would (``average_tokens_across_devices``).

        Default: Trainer's own loss for this model (``compute_loss_func``, the label smoother, or the model's
        ``loss_function``), as ``Trainer.compute_loss`` computes it.

        Example (a subclass that weighs every token's loss by 2)::

            class Weighted(PipelineTrainer):
                def compute_pipeline_loss(self, logits, labels, num_items_in_batch=None):
                    return 2 * super().compute_pipeline_loss(logits, labels, num_items_in_batch)
        """
        info, state = self._pp_loss_info, self._pp.loss_state
        shifted = self.pipeline_labels_are_shifted
        if self.compute_loss_func is not None:
            return self.compute_loss_func(logits, labels, num_items_in_batch=num_items_in_batch)
        if self.label_smoother is not None:  # label_smoothing_factor, applied as Trainer applies it
            return self.label_smoother({"logits": logits}, labels, shift_labels=info["smoother_shifts"] and not shifted,
                                       num_items_in_batch=num_items_in_batch)
        loss_function = info["loss_function"]
        if self._pp_pooled:
            # The model's loss is a mean over the rows it gets, and ignores num_items_in_batch (Trainer does not
            # divide it by the accumulation steps either): weigh each microbatch by its share of the batch.
            loss = loss_function(labels=labels, pooled_logits=logits, config=info["config"])
            return loss * (labels.shape[0] / state["samples"])
        if info["token_classifier"]:
            # The model's loss is a mean over the label tokens of the batch it gets (Trainer's num_items_in_batch
            # does not reach it): sum over this microbatch, divided by the label tokens of this batch.
            return loss_function(logits, labels, info["config"], num_items_in_batch=state["batch_items"])
        if shifted:
            return loss_function(logits, None, info["vocab"], shift_labels=labels, num_items_in_batch=num_items_in_batch)
        return loss_function(logits, labels, info["vocab"], num_items_in_batch=num_items_in_batch)

    @property
    def pipeline_labels_are_shifted(self) -> bool:
        """Whether the labels :meth:`compute_pipeline_loss` gets are the batch's ``shift_labels`` (no shift)."""
        return bool(self._pp is not None and self._pp.loss_state.get("shifted"))

    def _pipeline_loss_fn(self, loss_state: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The schedule's ``loss_fn(logits, labels)``: the hook, normalised by the items of the whole optimizer
        step (``loss_state`` holds them for the current batch) and scaled for DP averaging as Trainer scales."""

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.compute_pipeline_loss(logits, labels, num_items_in_batch=loss_state["num_items"]) * loss_state["scale"]

        return loss_fn

    def _set_loss_state(self, inputs: dict[str, Any], num_items_in_batch, *, training: bool = True) -> None:
        """What the loss of this batch is normalised by (read by every microbatch's loss on the last stage)."""
        pp = self._pp
        target = loss_target(inputs)
        averaging = self.args.average_tokens_across_devices and pp.dp_size > 1
        scale = pp.dp_size if averaging else 1
        if not self.model_accepts_loss_kwargs and self.compute_loss_func is None:
            # Trainer gives such a model (Qwen-VL, Gemma 3, ...) no num_items_in_batch: its loss is the mean over
            # this batch's tokens, divided by the accumulation steps in training (not in evaluation), never
            # scaled for DP.
            num_items_in_batch = self._counted_labels(inputs).ne(-100).sum()
            scale = 1 / self.current_gradient_accumulation_steps if training else 1
        pp.loss_state.update(num_items=num_items_in_batch, scale=scale,
                             samples=target.shape[0], batch_items=target.ne(-100).sum(),
                             shifted=torch.is_tensor(inputs.get("shift_labels")))

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
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([inputs], pp.device)
        self._set_loss_state(inputs, num_items_in_batch)
        inputs = self._stage_inputs(inputs)
        check_batch(inputs, microbatch_size=pp.microbatch_size, limit=max_positions(self.model),
                    per_token_labels=not self._pp_pooled)
        loss = self._run_schedule(inputs, training=True)
        check_loss_finite(loss, step=self.state.global_step + 1, pp=pp,
                          raise_error=getattr(self.args, "pp_raise_on_nan_inf", False))
        if self.accelerator.sync_gradients:
            pp.finish_gradients()
        return loss

    def _run_schedule(self, inputs: dict[str, Any], *, training: bool) -> torch.Tensor:
        pp = self._pp
        input_ids, labels = inputs["input_ids"], loss_target(inputs)
        batch, seq = input_ids.shape[:2]
        schedule = pp.schedule_for(batch, seq, training=training)
        kwargs = {k: inputs[k] for k in STAGE_KWARGS if inputs.get(k) is not None}
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
        self._pp_microbatch_losses = len(losses)  # the step's own microbatches (shape inference runs loss_fn too)
        local = torch.stack(losses).sum() if pp.has_last else torch.zeros((), device=pp.device)
        return pp.share_last_stage_value(local.float())

    def _clip_grad_norm(self, model):
        """Clip over all stages of the pipeline (Trainer clips one process's parameters)."""
        if self._pp is None:
            return super()._clip_grad_norm(model)
        return self._pp.clip_grad_norm(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The norm over all stages of the pipeline (Trainer's is one process's)."""
        if self._pp is None:
            return super()._get_grad_norm(model, grad_norm)
        return (grad_norm if grad_norm is not None else self._pp.grad_norm()).item()
