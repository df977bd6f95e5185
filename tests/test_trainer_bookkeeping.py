"""What Trainer reports about a run means the same under pipelining: batch sizes and device counts in the
model card, the trainable-parameter count it logs, total_flos, num_input_tokens_seen, save_model's log
line and the saved config.json, each compared with Trainer's own value for the same run."""

from __future__ import annotations

import json
import logging
import os

import pytest

from helpers.distributed import run_distributed
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
    save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, log_level="info",
    include_num_input_tokens_seen="all",
)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _card_hyperparameters(output_dir: str) -> dict[str, str]:
    """The 'Training hyperparameters' list of the model card Trainer writes."""
    with open(os.path.join(output_dir, "README.md")) as f:
        text = f.read().split("### Training hyperparameters", 1)[1].split("###", 1)[0]
    pairs = [line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- ")]
    return dict(pairs)


def _report(trainer, output_dir: str, lora: bool) -> dict:
    """Everything the test compares, read off a finished run (every rank calls it)."""
    lines = _Lines()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(lines)
    try:
        trainer.train()
        trainer.save_model(os.path.join(output_dir, "final"))
    finally:
        trainer_logger.removeHandler(lines)
    report = {"total_flos": trainer.state.total_flos, "tokens": trainer.state.num_input_tokens_seen,
              "lines": [line for line in lines.lines if "trainable parameters" in line or "Saving model" in line
                        or "Total train batch size" in line]}
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name="tiny")
        report["card"] = _card_hyperparameters(output_dir)
        if not lora:
            with open(os.path.join(output_dir, "final", "config.json")) as f:
                report["config"] = json.load(f)
    return report


def _data():
    # One length: each replica's padded batch then holds the tokens of its share of the global batch.
    return CountingDataset(min_len=10, max_len=10)


def _model(lora: bool):
    model = tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return model


def _reference(output_dir: str, lora: bool, dp: int) -> dict:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=output_dir, **{**COMMON, "per_device_train_batch_size": 4 * dp})
    trainer = Trainer(model=_model(lora), args=args, train_dataset=_data(), data_collator=pad_collator)
    return _report(trainer, output_dir, lora)


def _pipeline_worker(rank, world_size, output_dir, lora):
    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **COMMON)
    trainer = PipelineTrainer(model=_model(lora), args=args, train_dataset=_data(), data_collator=pad_collator)
    return _report(trainer, output_dir, lora)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,lora", [(2, False), (2, True), (4, False)])
def test_trainer_bookkeeping_means_what_it_means_in_trainer(tmp_path, world_size, lora):
    dp = world_size // 2
    reference = _reference(str(tmp_path / "ref"), lora, dp)
    per_rank = run_distributed(_pipeline_worker, world_size, str(tmp_path / "pp"), lora, timeout_s=400)
    first = per_rank[0]
    assert first["card"].pop("distributed_type") == "multi-GPU"  # several processes, as Trainer says of DDP too
    if dp == 1:
        # One replica of twice the batch differs only by the batch the card names.
        assert first["card"] == reference["card"]
    else:
        card, ref_card = dict(first["card"]), dict(reference["card"])
        assert card.pop("num_devices") == str(dp)
        assert card.pop("total_train_batch_size") == ref_card.pop("total_train_batch_size") == "16"
        assert card.pop("train_batch_size") == "4" and ref_card.pop("train_batch_size") == "8"
        assert card.pop("total_eval_batch_size") == str(dp * int(ref_card["eval_batch_size"]))
        assert card == ref_card
    for rank, got in enumerate(per_rank):
        assert got["total_flos"] == pytest.approx(reference["total_flos"], rel=1e-12), f"rank {rank} total_flos"
        assert got["tokens"] == reference["tokens"], f"rank {rank} num_input_tokens_seen"
    assert reference["total_flos"] > 0 and reference["tokens"] > 0
    # Rank 0 logs (the replicas' log level is warning): Trainer's lines, Trainer's numbers.
    ref_lines = [line.replace(str(tmp_path / "ref"), "DIR") for line in reference["lines"]]
    assert [line.replace(str(tmp_path / "pp"), "DIR") for line in first["lines"]] == ref_lines
    assert any("trainable parameters" in line for line in ref_lines) and any("Saving model" in line for line in ref_lines)
    if not lora:
        config, ref_config = first["config"], reference["config"]
        assert config == ref_config and config["dtype"] == "float32"
