"""Evaluation with data parallelism (pp=2 x dp=2): Trainer's eval_loss, with DDP-style replicas and FSDP."""

import pytest
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

ARGS = dict(per_device_eval_batch_size=4, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)


def _worker(rank, world_size, output_dir):
    out = {}
    for mode in ("ddp", "fsdp"):
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **ARGS)
        trainer = PipelineTrainer(model=tiny_llama(), args=args, eval_dataset=CountingDataset(size=16, seed=3),
                                  data_collator=pad_collator)
        out[mode] = trainer.evaluate()["eval_loss"]
    return out


@pytest.mark.slow
def test_eval_loss_under_pp2_x_dp2_matches_trainer(tmp_path):
    # Replica d evaluates batch d of every pair of 4-sample batches. Trainer with data parallelism averages each
    # pair over its label tokens together, which is one process evaluating batches of 8.
    ref_args = {**ARGS, "per_device_eval_batch_size": 2 * ARGS["per_device_eval_batch_size"]}
    reference = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref"), **ref_args),
                        eval_dataset=CountingDataset(size=16, seed=3), data_collator=pad_collator).evaluate()["eval_loss"]
    batch_means = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ref4"), **ARGS),
                          eval_dataset=CountingDataset(size=16, seed=3), data_collator=pad_collator).evaluate()["eval_loss"]
    assert batch_means != pytest.approx(reference, rel=1e-5), "the replicas' batches must differ in label tokens"
    for out in run_distributed(_worker, 4, str(tmp_path / "pp"), timeout_s=300):
        for mode, loss in out.items():
            assert loss == pytest.approx(reference, rel=1e-5), mode
