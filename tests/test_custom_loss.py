"""A Trainer subclass's own loss under pipelining: a compute_loss override is refused (never silently
replaced by cross entropy), and the same loss moved to compute_pipeline_loss equals the unsplit subclass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineMixin, PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0, learning_rate=3e-3,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)


def weighted_next_token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Cross entropy with odd target tokens weighted 3x, summed and divided by the step's label tokens."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    weights = 1.0 + 2.0 * (targets % 2 == 1)
    return (per_token * weights).sum() / num_items_in_batch


class WeightedTrainer(Trainer):
    """The unsplit subclass: the loss in compute_loss, as Trainer users write it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = weighted_next_token_loss(outputs.logits, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


class WeightedPipelineTrainer(PipelineMixin, WeightedTrainer):
    """The same loss moved to the last-stage hook."""

    def compute_pipeline_loss(self, logits, labels, num_items_in_batch=None):
        return weighted_next_token_loss(logits, labels, num_items_in_batch)


class ForgotTheHook(PipelineMixin, WeightedTrainer):
    pass


class OverridesCompute(PipelineTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("trainer_cls", [ForgotTheHook, OverridesCompute])
def test_a_compute_loss_override_without_the_hook_is_refused(tmp_path, trainer_cls):
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=2, **COMMON)
    with pytest.raises(PipelineConfigError, match="overrides compute_loss, which pipelining never calls") as err:
        trainer_cls(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    assert f"{trainer_cls.__name__}.compute_pipeline_loss" in str(err.value)


def test_without_pipelining_the_subclass_is_unchanged(tmp_path):
    args = PipelineTrainingArguments(output_dir=str(tmp_path), pp_size=1, **COMMON)
    trainer = ForgotTheHook(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=pad_collator)
    assert trainer.train().global_step == 4


def _pipeline_worker(rank, world_size, output_dir, schedule):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_schedule=schedule, **COMMON)
    trainer = WeightedPipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(),
                                      data_collator=pad_collator)
    trainer.train()
    return trainer.state.log_history, {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_the_loss_moved_to_the_hook_matches_the_unsplit_subclass(tmp_path, schedule):
    reference = WeightedTrainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **COMMON),
                                train_dataset=CountingDataset(), data_collator=pad_collator)
    reference.train()
    plain = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON),
                    train_dataset=CountingDataset(), data_collator=pad_collator)
    plain.train()
    ref_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]
    assert ref_losses != pytest.approx([h["loss"] for h in plain.state.log_history if "loss" in h], rel=1e-3)
    ref_params = dict(reference.model.named_parameters())
    for rank, (logs, params) in enumerate(run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"), schedule)):
        for key in ("loss", "grad_norm"):
            got = [h[key] for h in logs if "loss" in h]
            want = [h[key] for h in reference.state.log_history if "loss" in h]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
