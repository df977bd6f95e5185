"""The path of one Trainer batch to the pipeline schedule (the trainer layer owns it, start to end).

A collated batch is (1) refused if it cannot be cut into microbatches (padding-free,
one flattened row), (2) counted for the loss normaliser (label tokens over DP
replicas only, repeats that ``even_batches`` added masked), (3) given each row's
last-token position for a sequence classifier, (4) right-padded to the longest
sequence of all DP replicas and (5) checked for shapes the stages can run.

Example:
    >>> import torch
    >>> ids = torch.tensor([[5, 6, 7, 0]])
    >>> check_batch({"input_ids": ids, "labels": ids}, microbatch_size=1, limit=8)
    >>> mask_even_batches_padding({"labels": torch.ones(2, 3, dtype=torch.long)}, dp_rank=1, remainder=3)
    1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import PipelineConfigError
from .hf_patching import last_token_index
from .multimodal import multimodal_stage_inputs

__all__ = [
    "STAGE_KWARGS", "PADDING_FREE_KEYS", "check_collator_keeps_rows", "check_batch", "mask_even_batches_padding",
    "with_last_token_index", "pad_to_length", "loss_target", "BatchOverrides",
]

# Batch keys handed to every stage; everything else except the loss target is dropped.
STAGE_KWARGS = ("attention_mask", "position_ids", "last_token_index",
                # A VLM's (hf_pp.multimodal.multimodal_stage_inputs): masks it builds, its image inputs per sample.
                "causal_mask_mapping", "multimodal_inputs", "multimodal_rows")

# Keys of a padding-free batch: every sample flattened into one row, with sequence boundaries.
PADDING_FREE_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")

_ROWS_HINT = (
    "A pipeline cuts every batch into microbatches along its rows, and a padding-free batch is one row. Keep the "
    "samples as rows: with TRL use hf_pp.PipelineSFTTrainer (packing=True keeps packed rows, with position_ids that "
    "restart at each document so documents never attend to each other), or a padding collator such as "
    "DataCollatorForLanguageModeling / DataCollatorWithPadding."
)


def check_collator_keeps_rows(data_collator: Any) -> None:
    """Refuse, before training, a collator that flattens the batch into one row (padding-free).

    Example:
        >>> from transformers import DataCollatorWithFlattening
        >>> try:
        ...     check_collator_keeps_rows(DataCollatorWithFlattening())
        ... except PipelineConfigError as err:
        ...     print(str(err)[:60])
        data_collator=DataCollatorWithFlattening flattens each batch
    """
    from transformers import DataCollatorWithFlattening

    flattens = isinstance(data_collator, DataCollatorWithFlattening) or getattr(data_collator, "padding_free", False)
    if flattens:
        raise PipelineConfigError(
            f"data_collator={type(data_collator).__name__} flattens each batch into one padding-free row "
            f"(padding_free=True). {_ROWS_HINT}"
        )


def check_batch(inputs: dict, *, microbatch_size: int, limit: int | None, per_token_labels: bool = True) -> None:
    """Per-step data checks on the batch a pipeline is about to run (the same batch on its every rank).

    Example:
        >>> ids = torch.zeros(4, 8, dtype=torch.long)
        >>> check_batch({"input_ids": ids, "labels": ids}, microbatch_size=2, limit=64)
    """
    flattened = [k for k in PADDING_FREE_KEYS if k in inputs]
    if flattened:
        raise PipelineConfigError(f"A batch carries {flattened}: it is a padding-free batch. {_ROWS_HINT}")
    ids, labels = inputs.get("input_ids"), loss_target(inputs)
    if not torch.is_tensor(ids) or ids.dim() != 2:
        raise PipelineConfigError("Every batch needs 'input_ids' of shape (batch, sequence) for pipeline training.")
    if not torch.is_tensor(labels):
        raise PipelineConfigError("Pipeline training needs 'labels' in every batch (the last stage computes the loss).")
    if not per_token_labels and labels.shape[:1] != ids.shape[:1]:
        raise PipelineConfigError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}; a sequence classifier needs "
            "one label (or one row of labels) per sample."
        )
    if per_token_labels and labels.shape != ids.shape:
        name = "shift_labels" if "shift_labels" in inputs else "labels"
        raise PipelineConfigError(
            f"{name} have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}; the collator must give one "
            "label per token (-100 where no loss is wanted)."
        )
    if limit is not None and ids.shape[1] > limit:
        raise PipelineConfigError(
            f"A batch has sequences of {ids.shape[1]} tokens, more than max_position_embeddings={limit}; truncate "
            "the samples to at most that length."
        )
    if ids.shape[0] % microbatch_size != 0:
        raise PipelineConfigError(
            f"A batch of {ids.shape[0]} samples cannot be cut into microbatches of pp_microbatch_size="
            f"{microbatch_size} (usually the last, short batch of an epoch); set dataloader_drop_last=True or make "
            "the dataset size a multiple."
        )


def loss_target(inputs: dict) -> torch.Tensor | None:
    """What the last stage scores: ``shift_labels`` when the collator gives them (already shifted, as
    Trainer and the Hugging Face losses take them), else ``labels``."""
    shifted = inputs.get("shift_labels")
    return shifted if torch.is_tensor(shifted) else inputs.get("labels")


def mask_even_batches_padding(batch: dict, dp_rank: int, remainder: int) -> int:
    """Set labels of the samples ``even_batches`` repeated to fill the last batch to -100; return how many.

    With an uneven dataset, accelerate completes the last global batch with
    samples from the epoch's start so every DP replica runs as many steps. The
    real samples of that batch are its first ``remainder`` in rank order; masking
    the rest keeps every sample counted exactly once per epoch.

    Example:
        >>> b = {"labels": torch.ones(2, 3, dtype=torch.long)}
        >>> mask_even_batches_padding(b, dp_rank=1, remainder=3), b["labels"][:, 0].tolist()
        (1, [1, -100])
    """
    masked = 0
    for key in ("labels", "shift_labels"):
        labels = batch.get(key)
        if not torch.is_tensor(labels) or remainder <= 0:
            continue
        rows = labels.shape[0]
        keep = min(max(remainder - dp_rank * rows, 0), rows)
        if keep < rows:
            repeated = torch.arange(rows, device=labels.device) >= keep
            batch[key] = labels.masked_fill(repeated.view(-1, *[1] * (labels.dim() - 1)), -100)  # not in place
        masked = rows - keep
    return masked


def with_last_token_index(inputs: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """For a sequence classifier: the position each row is read at, taken before any DP padding."""
    ids = inputs.get("input_ids")
    if not torch.is_tensor(ids) or ids.dim() != 2:  # check_batch names a bad batch
        return inputs
    return {**inputs, "last_token_index": last_token_index(ids, pad_token_id)}


def pad_to_length(inputs: dict[str, Any], length: int, *, pad_token_id: int, per_token_labels: bool) -> dict[str, Any]:
    """Right-pad the batch's sequences to ``length``: pads carry attention_mask 0 and label -100.

    Safe for causal LMs: pads come after every real token. Position ids go on counting, so the pads of a packed
    row never join its last document's positions in a way that changes the real tokens (they come later).

    Example:
        >>> ids = torch.tensor([[5, 6]])
        >>> pad_to_length({"input_ids": ids, "labels": ids}, 4, pad_token_id=0, per_token_labels=True)["labels"]
        tensor([[   5,    6, -100, -100]])
    """
    extra = length - inputs["input_ids"].shape[1]
    if extra <= 0:
        return inputs
    fill = {"input_ids": pad_token_id, "attention_mask": 0}
    if per_token_labels:  # a classifier's labels are one per row, not per token
        fill.update(labels=-100, shift_labels=-100)
    padded = dict(inputs)
    for key, value in fill.items():
        if torch.is_tensor(inputs.get(key)):
            padded[key] = torch.nn.functional.pad(inputs[key], (0, extra), value=value)
    # Other per-token inputs (a VLM's token_type_ids, mm_token_type_ids): pads are text, type 0.
    ids_shape = inputs["input_ids"].shape
    for key, value in inputs.items():
        if key not in fill and key != "position_ids" and torch.is_tensor(value) and value.shape == ids_shape:
            padded[key] = torch.nn.functional.pad(value, (0, extra), value=0)
    if torch.is_tensor(inputs.get("position_ids")):
        last = inputs["position_ids"][:, -1:]
        steps = torch.arange(1, extra + 1, device=last.device)
        padded["position_ids"] = torch.cat([inputs["position_ids"], last + steps], dim=1)
    return padded


class BatchOverrides:
    """The Trainer hooks a batch passes through on its way to the schedule (mixed into PipelineMixin)."""

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Label tokens of the whole optimizer step, summed over DP ranks only (not pipeline ranks).

        Replaces Trainer's count, which sums over every process.
        """
        if self._pp is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        if not batch_samples or loss_target(batch_samples[0]) is None:
            raise PipelineConfigError("Pipeline training needs 'labels' in every batch (the last stage computes the loss).")
        state = self.accelerator.gradient_state
        if self._pp.dp_size > 1 and state.end_of_dataloader and state.remainder > 0:
            # even_batches filled the epoch's last batch with repeats: count every sample once.
            mask_even_batches_padding(batch_samples[-1], self._pp.dp_rank, state.remainder)
        count = sum(self._counted_labels(b).ne(-100).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self._pp.dp_size > 1:
            dist.all_reduce(count, group=self._pp.dp_group)
        return count

    def _counted_labels(self, batch: dict) -> torch.Tensor:
        """The labels the loss counts, as Trainer counts them: shift_labels as given, else labels shifted."""
        if torch.is_tensor(batch.get("shift_labels")):
            return batch["shift_labels"]
        return batch["labels"][..., 1:] if self._loss_shifts_labels else batch["labels"]

    def _stage_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch as every stage of this replica runs it: a classifier's last-token index, then DP padding,
        then, for a VLM, the positions, masks and per-sample image inputs every stage takes."""
        if self._pp_pooled:
            inputs = with_last_token_index(inputs, getattr(self.model.config.get_text_config(), "pad_token_id", None))
        inputs = self._pad_to_dp_length(inputs)
        if self._pp_multimodal is not None and torch.is_tensor(inputs.get("input_ids")):
            inputs = {**inputs, **multimodal_stage_inputs(self._pp.parts[0], self._pp_multimodal, inputs)}
        return inputs

    def _pad_to_dp_length(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Right-pad the batch to the longest sequence of all DP replicas.

        Replicas that see a new length re-run the stages' shape inference (a
        forward); under FSDP that forward's all-gathers would pair with another
        replica's reduce-scatters and deadlock. One shape for all replicas keeps
        their collectives in step.
        """
        pp = self._pp
        if pp.dp_size == 1 or not torch.is_tensor(inputs.get("input_ids")):
            return inputs
        length = torch.tensor(inputs["input_ids"].shape[1], device=pp.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=pp.dp_group)
        pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        return pad_to_length(inputs, int(length), pad_token_id=pad_id, per_token_labels=not self._pp_pooled)
