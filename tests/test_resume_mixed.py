"""Resuming continues exactly with FSDP-sharded stages (pp=2 x dp=2) and with PEFT adapters."""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from test_resume import COMMON, StopAfter
from trainer_fixtures import CountingDataset, pad_collator, tiny_llama


def _model(peft: bool):
    model = tiny_llama()
    if peft:
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def _losses(output_dir, mode, peft, stop=None, resume=False):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **COMMON)
    trainer = PipelineTrainer(model=_model(peft), args=args, train_dataset=CountingDataset(size=48),
                              data_collator=pad_collator, callbacks=[StopAfter(stop)] if stop else None)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _worker(rank, world_size, root, cases):
    out = {}
    for mode, peft in cases:
        name = f"{mode}-{'peft' if peft else 'full'}"
        straight = _losses(os.path.join(root, name, "straight"), mode, peft)
        _losses(os.path.join(root, name, "cut"), mode, peft, stop=4)
        resumed = _losses(os.path.join(root, name, "cut"), mode, peft, resume=True)
        out[name] = (straight, resumed)
    return out


@pytest.mark.slow
def test_resume_matches_uninterrupted_run_with_fsdp_and_with_peft(tmp_path):
    cases = [("fsdp", False), ("fsdp", True), ("ddp", True)]
    for name, (straight, resumed) in run_distributed(_worker, 4, str(tmp_path), cases, timeout_s=600)[0].items():
        # The resumed log carries steps 1-4 from the checkpoint's trainer state; 5-8 are new.
        assert sorted(resumed) == sorted(straight) == list(range(1, 9)), name
        for step in range(5, 9):
            assert resumed[step] == pytest.approx(straight[step], rel=1e-6), f"{name} step {step}"
