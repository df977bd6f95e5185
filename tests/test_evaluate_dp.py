"""Evaluation with data parallelism (pp=2 x dp=2): Trainer's eval_loss and compute_metrics, with DDP-style replicas
and FSDP (the replicas' batches have different lengths: their predictions are padded over the replicas)."""

import pytest
from transformers import Trainer, TrainingArguments

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama
from test_evaluate import accuracy, next_token_argmax

ARGS = dict(per_device_eval_batch_size=4, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)


def _worker(rank, world_size, output_dir):
    out = {}
    for mode in ("ddp", "fsdp"):
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **ARGS)
        trainer = PipelineTrainer(model=tiny_llama(), args=args, eval_dataset=CountingDataset(size=16, seed=3),
                                  data_collator=pad_collator)
        out[mode] = trainer.evaluate()["eval_loss"]
        trainer.compute_metrics, trainer.preprocess_logits_for_metrics = accuracy, next_token_argmax
        out[mode, "accuracy"] = trainer.evaluate(CountingDataset(size=14, seed=4))["eval_accuracy"]
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
    # 14 samples: the last round gives the replicas 4 and 2 (Trainer's remainder handling).
    accuracy_reference = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "acc"), **ARGS),
                                 compute_metrics=accuracy, preprocess_logits_for_metrics=next_token_argmax,
                                 data_collator=pad_collator).evaluate(CountingDataset(size=14, seed=4))["eval_accuracy"]
    for out in run_distributed(_worker, 4, str(tmp_path / "pp"), timeout_s=300):
        for mode in ("ddp", "fsdp"):
            assert out[mode] == pytest.approx(reference, rel=1e-5), mode
            assert out[mode, "accuracy"] == pytest.approx(accuracy_reference, rel=1e-6), mode
