"""TRL's ``SFTTrainer`` under pipelining: :class:`PipelineSFTTrainer` and :class:`PipelineSFTConfig`.

``SFTTrainer`` computes its loss and metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) from
the whole model's fused LM head; here the last stage computes the same numbers from its logits, per
microbatch, and every rank logs them. Packing (``packing=True``) keeps packed rows as rows: TRL's
default best-fit packing would flatten the batch into one padding-free row, which cannot be cut into
microbatches, so each row keeps its documents with ``position_ids`` restarting at every document and no
attention mask (transformers then keeps documents apart, exactly as TRL's padding-free batch does).

Needs TRL (``pip install hf_pp[trl]``); the rest of hf_pp imports without it.

Example::

    from hf_pp import PipelineSFTConfig, PipelineSFTTrainer

    args = PipelineSFTConfig(output_dir="out", pp_size=2, per_device_train_batch_size=8, packing=True,
                             max_length=512)
    trainer = PipelineSFTTrainer(model="path/to/model", args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()   # torchrun --nproc-per-node 2 sft.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers.trainer_utils import set_seed

from .errors import PipelineConfigError
from .multimodal import is_multimodal_config
from .trainer import PipelineMixin
from .training_args import PipelineArguments

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as exc:  # pragma: no cover - exercised without trl installed
    raise ImportError(
        "hf_pp.PipelineSFTTrainer and PipelineSFTConfig need TRL: pip install hf_pp[trl] (or pip install trl)."
    ) from exc

__all__ = ["PipelineSFTConfig", "PipelineSFTTrainer", "PackedRowsCollator"]


@dataclass
class PipelineSFTConfig(PipelineArguments, SFTConfig):
    """TRL's ``SFTConfig`` plus the ``pp_*`` fields (see :class:`hf_pp.PipelineArguments`).

    Example:
        >>> args = PipelineSFTConfig(output_dir="out", pp_size=2, per_device_train_batch_size=4, report_to="none",
        ...                          use_cpu=True)
        >>> args.pp_num_microbatches, args.packing
        (4, False)
    """


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """TRL's collator for packed rows, keeping them as rows (``padding_free=False``) with ``position_ids``.

    Each row's ``position_ids`` restart at every document; each document's first label is masked, as
    TRL's padding-free batch masks it (it would be predicted from the previous document). The attention
    mask stays in the batch for token counts; :class:`PipelineSFTTrainer` hands the stages only the
    position ids, so transformers builds the block-diagonal mask that keeps documents apart.

    Example:
        >>> collate = PackedRowsCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7, 8], "seq_lengths": [2, 2]}, {"input_ids": [9], "seq_lengths": [1]}])
        >>> batch["position_ids"].tolist(), batch["labels"].tolist()
        ([[0, 1, 0, 1], [0, 0, 0, 0]], [[-100, 6, -100, 8], [-100, -100, -100, -100]])
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id=pad_token_id, padding_free=False, return_position_ids=True,
                         pad_to_multiple_of=pad_to_multiple_of)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


class PipelineSFTTrainer(PipelineMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with the model split over ``args.pp_size`` pipeline ranks.

    Takes ``SFTTrainer``'s arguments (and ``parallelize_fn`` / ``module_fqns_per_model_part`` as
    :class:`hf_pp.PipelineTrainer`); ``args`` is a :class:`PipelineSFTConfig`. Datasets are prepared by
    TRL unchanged (prompt-completion, conversational with ``assistant_only_loss``, packing); the loss
    (``loss_type`` "nll" or "dft"), ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` equal
    ``SFTTrainer``'s on one process. ``peft_config`` is applied before the split, so adapters follow their
    layers. With ``pp_size=1`` it is ``SFTTrainer``.

    Refused under pipelining (before any communication): ``padding_free=True`` without packing,
    ``activation_offloading``, ``use_liger_kernel``, the MoE auxiliary loss (set
    ``router_aux_loss_coef=0.0``), ``model_init_kwargs`` with a model directory (use ``pp_load_dtype``),
    a custom ``data_collator`` with packing, and packed rows (``packing=True``, "bfd") with a
    vision-language model. A VLM with a processor as ``processing_class`` trains through TRL's
    ``DataCollatorForVisionLanguageModeling`` as in ``SFTTrainer``.
    """

    _parent_takes_peft_config = True

    def __init__(self, model, args: PipelineSFTConfig | None = None, *trainer_args: Any, **kwargs: Any):
        if getattr(args, "pp_size", 1) > 1 and kwargs.get("peft_config") is not None:
            set_seed(args.seed)  # SFTTrainer seeds just before it applies PEFT: the adapters start the same
        self._pp_sft_sums: list[torch.Tensor] = []  # per loss call on the last stage, since the step began
        super().__init__(model, args, *trainer_args, **kwargs)

    # ---- checks and the split ----------------------------------------------
    def _pipeline_checks(self, args, trainer_kwargs: dict) -> None:
        """TRL's options that cannot work when no rank holds the whole model, named."""
        super()._pipeline_checks(args, trainer_kwargs)
        packs_rows = args.packing and args.packing_strategy in ("bfd", "bfd_split")
        if args.padding_free and not args.packing:
            raise PipelineConfigError(
                "padding_free=True flattens each batch into one row, which a pipeline cannot cut into microbatches. "
                "Set padding_free=False, or packing=True (PipelineSFTTrainer keeps packed rows as rows, documents "
                "kept apart by position_ids)."
            )
        if (packs_rows or args.padding_free) and trainer_kwargs.get("data_collator") is not None:
            raise PipelineConfigError(
                "With packing=True PipelineSFTTrainer collates packed rows itself (hf_pp.sft_trainer."
                "PackedRowsCollator); drop data_collator, or set packing=False."
            )
        for option in ("activation_offloading", "use_liger_kernel"):
            if getattr(args, option, False):
                raise PipelineConfigError(
                    f"{option}=True is not supported with pp_size > 1: it wraps the whole model's forward, which "
                    f"no pipeline rank runs. Set {option}=False (activation_checkpointing works per stage)."
                )
        if args.model_init_kwargs:
            raise PipelineConfigError(
                f"model_init_kwargs={args.model_init_kwargs!r} is not used with pp_size > 1: each rank builds its "
                "stages from the model directory itself. Drop it; for the dtype set pp_load_dtype."
            )

    def _check_sft_model(self) -> None:
        """After SFTTrainer settled the model's options: refuse what the stages would silently drop."""
        config = getattr(self.model, "config", None)
        if self.padding_free and config is not None and is_multimodal_config(config):
            raise PipelineConfigError(
                f"packing=True (packing_strategy={self.args.packing_strategy!r}) with a vision-language model "
                f"({type(self.model).__name__}) is not supported with pp_size > 1: packed rows keep their documents "
                "apart by position_ids alone, and a VLM's forward computes the positions and masks its language model "
                "takes its own way (Qwen-VL's 3-D rotary positions), so documents would not be kept apart as in "
                "trl.SFTTrainer. Set packing=False, or packing_strategy='wrapped'."
            )
        if getattr(self, "aux_loss_enabled", False):
            raise PipelineConfigError(
                f"The MoE load-balancing loss (router_aux_loss_coef={self.router_aux_loss_coef}) is not supported "
                "with pp_size > 1 yet: the router logits of every layer would be needed on the last stage. Set "
                "router_aux_loss_coef=0.0 in the PipelineSFTConfig, or pp_size=1."
            )

    def _build_pipeline(self, parallelize_fn):
        self._check_sft_model()
        if self.padding_free:
            # TRL chose a padding-free collator for packing: keep the packed rows as rows instead.
            self.data_collator = PackedRowsCollator(self._tokenizer.pad_token_id, self.args.pad_to_multiple_of)
            self.padding_free = False
            self._pp_packed_rows = True
        else:
            self._pp_packed_rows = False
        return super()._build_pipeline(parallelize_fn)

    def _stage_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Packed rows reach the stages with position ids only: the padding mask would join their documents."""
        inputs = super()._stage_inputs(inputs)
        if self._pp_packed_rows:
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        return inputs

    # ---- loss and metrics, on the last stage --------------------------------
    def compute_pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                              num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """SFTTrainer's loss of one microbatch (``loss_type`` "nll" or "dft"), and its metrics' sums.

        ``compute_loss_func`` and label smoothing go through Trainer's own path, as in SFTTrainer.
        """
        given = logits, labels
        if not self.pipeline_labels_are_shifted:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        log_probs = logits.float().log_softmax(-1)
        token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
            correct = (logits.argmax(-1) == labels) & mask
            self._pp_sft_sums.append(torch.stack([entropy.sum(), correct.sum().float(), mask.sum().float()]))
        if self.compute_loss_func is not None or (self.label_smoother is not None and self.args.loss_type == "nll"):
            return super().compute_pipeline_loss(*given, num_items_in_batch)
        per_token = -token_log_probs
        if self.args.loss_type == "dft":  # https://huggingface.co/papers/2508.05629
            per_token = per_token * token_log_probs.exp().detach()
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return per_token.sum() / torch.as_tensor(count).clamp(min=1)

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The pipeline's step, then SFTTrainer's train metrics from the last stage's sums."""
        if self._pp is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._pp_sft_sums = []
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._record_sft_metrics("train", inputs)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The pipeline's forward-only pass, then SFTTrainer's eval metrics."""
        if self._pp is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self._pp_sft_sums = []
        output = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if output[0] is not None:
            self._record_sft_metrics("eval", inputs)
        return output

    def _record_sft_metrics(self, mode: str, inputs: dict[str, Any]) -> None:
        """``entropy`` and ``mean_token_accuracy`` over this batch of all replicas, ``num_tokens`` so far."""
        pp = self._pp
        # The step's own microbatches are the last calls: a new shape's inference pass calls the loss first.
        calls = self._pp_sft_sums[-self._pp_microbatch_losses:] if pp.has_last else []
        sums = torch.stack(calls).sum(0).to(pp.device) if calls else torch.zeros(3, device=pp.device)
        sums = pp.share_last_stage_value(sums)
        if pp.dp_size > 1:
            dist.all_reduce(sums, group=pp.dp_group)
        entropy, correct, valid = sums.tolist()
        self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        if mode == "train":
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["input_ids"].numel())
            tokens = tokens.to(pp.device)
            if pp.dp_size > 1:
                dist.all_reduce(tokens, group=pp.dp_group)
            self._total_train_tokens += int(tokens)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
