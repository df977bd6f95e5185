"""Checkpoints move between Trainer and PipelineTrainer: a Trainer checkpoint resumes under the pipeline
(weights and optimizer state, each rank taking its parameters), and a pipelined checkpoint resumes without
pipelining; either way the continued run equals the uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4, learning_rate=3e-3,
    lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, logging_steps=1, save_strategy="steps",
    save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, weight_decay=0.01,
)


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _pipeline(output_dir: str, pp_size: int, model=None) -> PipelineTrainer:
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=pp_size, **COMMON)
    return PipelineTrainer(model=model or tiny_llama(), args=args, train_dataset=CountingDataset(size=24),
                           data_collator=pad_collator)


def _resume_trainer_checkpoint_worker(rank, world_size, checkpoint, root):
    trainer = _pipeline(os.path.join(root, "from-trainer"), 2)
    trainer.train(resume_from_checkpoint=checkpoint)
    resumed = _losses(trainer)
    # And back: the pipeline's own checkpoint of step 3, resumed without pipelining (pp_size=1), below.
    straight = _pipeline(os.path.join(root, "pipelined"), 2)
    straight.train()
    return resumed, _losses(straight), {n: p.detach().clone() for n, p in trainer.model.original_named_parameters()}


@pytest.mark.slow
def test_checkpoints_resume_across_trainer_and_pipeline_trainer(tmp_path):
    reference = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "trainer"), **COMMON),
                        train_dataset=CountingDataset(size=24), data_collator=pad_collator)
    reference.train()
    ref_losses = _losses(reference)
    checkpoint = str(tmp_path / "trainer" / "checkpoint-3")
    assert os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
    per_rank = run_distributed(_resume_trainer_checkpoint_worker, 2, checkpoint, str(tmp_path), timeout_s=600)
    ref_params = dict(reference.model.named_parameters())
    for rank, (resumed, pipelined, params) in enumerate(per_rank):
        assert {4, 5, 6} <= set(resumed), resumed
        for step in (4, 5, 6):  # the continued run, step for step the uninterrupted one
            assert resumed[step] == pytest.approx(ref_losses[step], rel=1e-5), f"rank {rank} step {step}"
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    pipelined = per_rank[0][1]

    # The pipelined checkpoint resumed by PipelineTrainer(pp_size=1), which is Trainer otherwise.
    back = _pipeline(str(tmp_path / "back"), 1)
    back.train(resume_from_checkpoint=str(tmp_path / "pipelined" / "checkpoint-3"))
    continued = _losses(back)
    assert {4, 5, 6} <= set(continued), continued
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(pipelined[step], rel=1e-5), f"step {step}"
    # Plain Trainer finds no optimizer.pt there: it stops (it takes the pipeline_optimizer directory for a sharded
    # optimizer of its own) rather than restarting the optimizer without a word. README says how to convert.
    plain = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON),
                    train_dataset=CountingDataset(size=24), data_collator=pad_collator)
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        plain.train(resume_from_checkpoint=str(tmp_path / "pipelined" / "checkpoint-3"))
