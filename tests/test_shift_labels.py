"""Batches that carry ``shift_labels`` (already shifted, as context-parallel and some padding-free collators give
them) are scored on them, as Trainer's model loss scores them; the counted label tokens follow them too."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama
from hf_pp import PipelineTrainer, PipelineTrainingArguments

COMMON = dict(
    max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0, learning_rate=3e-3,
    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
)


def shifted_collator(features):
    """Labels shifted by the collator, with every third target masked: not what shifting ``labels`` gives."""
    batch = pad_collator(features)
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shifted[:, ::3] = -100
    return {**batch, "shift_labels": shifted}


def _losses(trainer):
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def _pipeline_worker(rank, world_size, output_dir):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), data_collator=shifted_collator)
    trainer.train()
    return _losses(trainer)


@pytest.mark.slow
def test_shift_labels_are_scored_as_trainer_scores_them(tmp_path):
    def reference(collator):
        trainer = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **COMMON),
                          train_dataset=CountingDataset(), data_collator=collator)
        trainer.train()
        return _losses(trainer)

    with_shift, plain = reference(shifted_collator), reference(pad_collator)
    assert with_shift[0][0] != pytest.approx(plain[0][0], rel=1e-4), "the shifted labels must change the loss"
    for rank, got in enumerate(run_distributed(_pipeline_worker, 2, str(tmp_path / "pp"))):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(with_shift), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"rank {rank}: {m}")
