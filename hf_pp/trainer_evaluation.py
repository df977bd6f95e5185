"""Evaluation through the stages: Trainer's ``prediction_step`` as a forward-only pipeline pass, and
predictions gathered over data-parallel replicas only (a pipeline's ranks share one batch).

``evaluate()`` keeps the logits on the last stage: ``compute_metrics`` runs on the last stage's rank of each
replica and the metrics dict is sent to the other pipeline ranks. ``predict()`` returns predictions, so they
go to every rank, as Trainer returns them on every process."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist

from .evaluation import broadcast_last_stage_output, forward_only_schedule, gather_over_group, pad_over_group
from .functional import make_pipeline_stages
from .reliability import RankFailedError
from .runtime import cached_by_shape
from .trainer_batches import STAGE_KWARGS, loss_target

__all__ = ["EvaluationOverrides"]


class EvaluationOverrides:
    """Trainer's evaluation hooks under pipelining (mixed into PipelineMixin)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Replaces Trainer's forward with a forward-only pass through the stages (any schedule, ZBV included).

        The loss is Trainer's (label tokens of this batch); with
        ``prediction_loss_only=False`` the last stage's logits are returned with
        the labels: inside ``evaluate()`` on the last stage's ranks only (None
        elsewhere), otherwise sent to every pipeline rank, as Trainer returns them.
        """
        if self._pp is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        pp = self._pp
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        labels = loss_target(inputs) if has_labels else None
        if labels is not None:
            # Trainer's evaluation loss: over the label tokens of this batch on all replicas, then scaled by their
            # number (the replicas' losses are averaged later), as in training.
            items = self._counted_labels(inputs).ne(-100).sum()
            if self.args.average_tokens_across_devices and pp.dp_size > 1:
                dist.all_reduce(items, group=pp.dp_group)
            self._set_loss_state(inputs, items, training=False)
        length = inputs["input_ids"].shape[1]
        # Replicas run one shape: FSDP collectives stay paired.
        padded = self._stage_inputs(inputs)
        given_labels = inputs.get("labels") if has_labels else None

        def finish(logits: torch.Tensor):
            # On the last stage, before anything crosses: the replicas' common padding comes off, and
            # preprocess_logits_for_metrics shrinks what the other pipeline ranks receive.
            logits = logits if self._pp_pooled else logits[:, :length]
            preprocess = getattr(self, "_pp_preprocess_logits", None)
            return logits if preprocess is None else preprocess(logits, given_labels)

        with torch.no_grad():
            loss, logits = self._pp_forward_only(padded, loss_target(padded) if labels is not None else None,
                                                 want_logits=not prediction_loss_only, finish=finish)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, given_labels

    def _pp_forward_only(self, inputs: dict[str, Any], labels: torch.Tensor | None, *, want_logits: bool,
                         finish=lambda logits: logits):
        """(loss or None, logits or None), the same on every pipeline rank; ``finish`` runs on the last stage's
        logits before they are sent."""
        pp = self._pp
        input_ids = inputs["input_ids"]
        schedule = self._pp_eval_schedule(*input_ids.shape[:2], with_loss=labels is not None)
        kwargs = {k: inputs[k] for k in STAGE_KWARGS if inputs.get(k) is not None}
        losses: list[torch.Tensor] | None = [] if labels is not None else None
        args = (input_ids,) if pp.has_first else ()
        target = labels if pp.has_last and labels is not None else None
        output = schedule.eval(*args, target=target, losses=losses, return_outputs=want_logits, **kwargs)
        # torch clears a stage's outputs at the start of its next step, and a forward-only pass never pops its
        # forward cache: without this the cached schedule of each eval shape keeps this batch's activations
        # on every stage (the logits on the last) until that shape comes again.
        for stage in schedule._stages:
            stage.clear_runtime_states()
        loss = logits = None
        if labels is not None:
            self._pp_microbatch_losses = len(losses)
            local = torch.stack(losses).sum() if pp.has_last else torch.zeros((), device=pp.device)
            loss = pp.share_last_stage_value(local.float())
        if want_logits and getattr(self, "_pp_logits_stay_on_last", False):
            logits = finish(output) if pp.has_last else None
        elif want_logits:
            _, last_rank = self._pp_eval_layout()
            logits = broadcast_last_stage_output(finish(output) if pp.has_last else None, last_rank, pp.pp_group,
                                                 pp.device)
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
        """A forward-only schedule for this input shape, built once (torch fixes shapes per stage; at most
        SCHEDULES_KEPT shapes are kept)."""
        schedules = self.__dict__.setdefault("_pp_eval_schedules", OrderedDict())
        pp = self._pp

        def build():
            # Equal microbatches (fixed P2P buffers): the most, of at least pp_microbatch_size samples, dividing the batch.
            n = next(k for k in range(max(1, batch // pp.microbatch_size), 0, -1) if batch % k == 0)
            stages = make_pipeline_stages(pp.parts, pp.stage_ids, pp.num_stages, pp.device, pp.pp_mesh)
            stage_ids_by_rank, _ = self._pp_eval_layout()
            return forward_only_schedule(stages, stage_ids_by_rank, n, pp.loss_fn if with_loss else None)

        return cached_by_shape(schedules, (batch, seq, with_loss), build)

    def _pp_gather_for_metrics(self, data):
        """Trainer's ``gather_for_metrics`` over data-parallel replicas only (a pipeline's ranks share a batch)."""
        if isinstance(data, (tuple, list)):
            return type(data)(self._pp_gather_for_metrics(d) for d in data)
        state = self.accelerator.gradient_state
        keep = state.remainder if state.end_of_dataloader and state.remainder > 0 else None
        return gather_over_group(data, self._pp.dp_group, keep)

    def _pp_pad_for_metrics(self, tensor, dim: int = 0, pad_index: int = 0, pad_first: bool = False):
        """accelerate's ``pad_across_processes`` over data-parallel replicas only: the logits exist on the last
        stage's ranks alone, which must not wait for the other pipeline ranks."""
        return pad_over_group(tensor, self._pp.dp_group, dim, pad_index, pad_first)

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """Trainer's loop; under pipelining it gathers predictions over DP replicas, not every rank, and
        ``preprocess_logits_for_metrics`` runs on the last stage, before the logits cross to other ranks.

        Except in ``predict()`` the logits never leave the last stage's ranks: ``compute_metrics`` runs there
        (one rank per replica, on the predictions of all replicas, as on every Trainer process) and its dict
        is sent to the other pipeline ranks, so every rank returns Trainer's metrics. ``predict()`` returns the
        predictions themselves, so they go to every rank.
        """
        if self._pp is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        pp = self._pp
        self._pp_logits_stay_on_last = description != "Prediction"
        self.gather_function = self._pp_gather_for_metrics  # Trainer resets it at the end of the loop
        self._pp_preprocess_logits, self.preprocess_logits_for_metrics = self.preprocess_logits_for_metrics, None
        # An instance attribute over the method, for this loop only: Trainer pads logits before gathering them.
        self.accelerator.pad_across_processes = self._pp_pad_for_metrics
        user_metrics, failure = self.compute_metrics, {}
        if self._pp_logits_stay_on_last and user_metrics is not None:
            self.compute_metrics = _first_failure_kept(user_metrics, failure)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            self.preprocess_logits_for_metrics, self._pp_preprocess_logits = self._pp_preprocess_logits, None
            self.compute_metrics, self._pp_logits_stay_on_last = user_metrics, False
            del self.accelerator.pad_across_processes
        if description == "Prediction":
            return output
        # The last stage's metrics (and a compute_metrics failure there) reach every pipeline rank.
        _, last_rank = self._pp_eval_layout()
        shared = [(output.metrics, failure.get("error"))] if pp.has_last else [None]
        dist.broadcast_object_list(shared, src=last_rank, group=pp.pp_group)
        metrics, error = shared[0]
        if error is not None:
            if pp.has_last:
                raise failure["exception"]
            raise RankFailedError(f"compute_metrics failed on rank {last_rank} (it runs on the last pipeline "
                                  f"stage, where the logits are): {error}")
        return output._replace(metrics=metrics)


def _first_failure_kept(compute_metrics, failure: dict):
    """``compute_metrics``, but its first exception is kept in ``failure`` instead of raised (and later calls are
    skipped), so the last stage finishes the loop's collectives and the error reaches every pipeline rank."""

    def call(*args, **kwargs):
        if "error" in failure:
            return {}
        try:
            return compute_metrics(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised after the loop, on every rank
            failure.update(error=f"{type(exc).__name__}: {exc}", exception=exc)
            return {}

    return call
