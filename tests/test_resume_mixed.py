"""Resuming continues exactly with FSDP-sharded stages (pp=2 x dp=2) and with PEFT adapters;
a PEFT run's checkpoints hold the adapter (plus optimizer state), never the full model."""

import glob
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open

from helpers.distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from hf_pp.checkpoint import PIPELINE_OPTIMIZER, pipeline_optimizer_format
from test_resume import COMMON, StopAfter
from helpers.trainer_fixtures import CountingDataset, pad_collator, tiny_llama


def _model(peft: bool | str):
    """The tiny Llama; with ``peft`` a LoRA on it (``peft`` a string: an adapter of that name, not "default")."""
    model = tiny_llama()
    if peft:
        torch.manual_seed(1)
        name = peft if isinstance(peft, str) else "default"
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=name)
    return model


def _case_name(mode, peft):
    return f"{mode}-{'full' if not peft else peft if isinstance(peft, str) else 'peft'}"


def _losses(output_dir, mode, peft, stop=None, resume=False):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **COMMON)
    trainer = PipelineTrainer(model=_model(peft), args=args, train_dataset=CountingDataset(size=48),
                              data_collator=pad_collator, callbacks=[StopAfter(stop)] if stop else None)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _worker(rank, world_size, root, cases):
    out = {}
    for mode, peft in cases:
        name = _case_name(mode, peft)
        straight = _losses(os.path.join(root, name, "straight"), mode, peft)
        _losses(os.path.join(root, name, "cut"), mode, peft, stop=4)
        resumed = _losses(os.path.join(root, name, "cut"), mode, peft, resume=True)
        out[name] = (straight, resumed)
    return out


def _checkpoints(root, name):
    found = sorted(glob.glob(os.path.join(root, name, "*", "checkpoint-*")))
    assert found, f"{name}: no checkpoint was written"
    return found


def _assert_peft_checkpoint(checkpoint, peft):
    root_files = set(os.listdir(checkpoint))
    if isinstance(peft, str):  # PEFT's layout: an adapter not named "default" lives in a subdirectory of its name
        assert "adapter_model.safetensors" not in root_files, sorted(root_files)
        assert PIPELINE_OPTIMIZER in root_files, f"{checkpoint}: the optimizer state of every rank"
        checkpoint = os.path.join(checkpoint, peft)
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, f"{checkpoint}: {sorted(files)}"
    full = sorted(f for f in files if f.startswith("model") and f.endswith((".safetensors", ".index.json")))
    assert full == [], f"{checkpoint} holds full-model weights {full}; a PEFT checkpoint holds the adapter only"
    # Exactly the adapter PEFT's own save_pretrained would write, from every stage.
    with safe_open(os.path.join(checkpoint, "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    model = _model(peft)
    assert saved == set(get_peft_model_state_dict(model, adapter_name=model.active_adapter)), checkpoint
    assert pipeline_optimizer_format(os.path.dirname(checkpoint) if isinstance(peft, str) else checkpoint) == "dcp", (
        f"{checkpoint}: the optimizer state of every rank")


@pytest.mark.slow
def test_resume_matches_uninterrupted_run_with_fsdp_and_with_peft(tmp_path):
    cases = [("fsdp", False), ("fsdp", True), ("ddp", "sql")]
    for name, (straight, resumed) in run_distributed(_worker, 4, str(tmp_path), cases, timeout_s=600)[0].items():
        # The resumed log carries steps 1-4 from the checkpoint's trainer state; 5-8 are new.
        assert sorted(resumed) == sorted(straight) == list(range(1, 9)), name
        for step in range(5, 9):
            assert resumed[step] == pytest.approx(straight[step], rel=1e-6), f"{name} step {step}"
    for mode, peft in cases:
        name = _case_name(mode, peft)
        for checkpoint in _checkpoints(str(tmp_path), name):
            if peft:
                _assert_peft_checkpoint(checkpoint, peft)
            else:  # the contrast: a full fine-tune's checkpoint holds the model and no adapter
                files = os.listdir(checkpoint)
                assert "adapter_model.safetensors" not in files and any(f.startswith("model") for f in files), files



class CountingReads:
    """Counts the optimizer-state elements this rank asks ``torch.distributed.checkpoint`` to read (the plan DCP's
    file reader executes: a request for a whole tensor would show as its whole size)."""

    def __enter__(self):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.planner import LoadItemType

        self.elements, self._cls, self._real = 0, FileSystemReader, FileSystemReader.read_data

        def read_data(reader, plan, planner):
            self.elements += sum(math.prod(item.lengths) for item in plan.items if item.type == LoadItemType.TENSOR)
            return self._real(reader, plan, planner)

        FileSystemReader.read_data = read_data
        return self

    def __exit__(self, *exc):
        self._cls.read_data = self._real


def _own_state_elements(optimizer) -> int:
    """Elements of this rank's optimizer state tensors as held (an FSDP shard: its local part)."""
    return sum((v.to_local() if hasattr(v, "to_local") else v).numel()
               for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def _layout_trainer(output_dir, mode, batch, stop=None):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode,
                                     **{**COMMON, "per_device_train_batch_size": batch})
    return PipelineTrainer(model=_model(False), args=args, train_dataset=CountingDataset(size=48),
                           data_collator=pad_collator, callbacks=[StopAfter(stop)] if stop else None)


def _logged(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _resume_counted(trainer, checkpoint):
    with CountingReads() as reads:
        trainer.train(resume_from_checkpoint=checkpoint)
    return _logged(trainer), reads.elements, _own_state_elements(trainer.optimizer)


def _ddp_to_fsdp_worker(rank, world_size, root):
    straight = _layout_trainer(os.path.join(root, "straight"), "ddp", 4)
    straight.train()
    _layout_trainer(os.path.join(root, "cut"), "ddp", 4, stop=4).train()
    checkpoint = os.path.join(root, "cut", "checkpoint-4")
    return _logged(straight), _resume_counted(_layout_trainer(os.path.join(root, "fsdp"), "fsdp", 4), checkpoint)


def _dp1_worker(rank, world_size, root):
    # One replica in place of two: twice the samples per device keeps the global batch (and the data order).
    return _resume_counted(_layout_trainer(os.path.join(root, "dp1"), "ddp", 8), os.path.join(root, "cut", "checkpoint-4"))


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp_and_on_one_replica_reading_only_each_ranks_share(tmp_path):
    """pp=2 x dp=2 DDP, stopped at step 4, resumed (a) under FSDP at dp=2, (b) at dp=1: both continue the
    uninterrupted run, and each rank asks DCP for its own parameters' state only (its FSDP shard under FSDP)."""
    per_rank = run_distributed(_ddp_to_fsdp_worker, 4, str(tmp_path), timeout_s=600)
    straight = per_rank[0][0]
    assert sorted(straight) == list(range(1, 9))
    per_rank1 = run_distributed(_dp1_worker, 2, str(tmp_path), timeout_s=600)
    whole_stage = {}
    for label, results in (("fsdp", [r[1] for r in per_rank]), ("dp=1", per_rank1)):
        for rank, (losses, read, own) in enumerate(results):
            assert sorted(losses) == list(range(1, 9)), (label, rank)
            for step in range(5, 9):
                assert losses[step] == pytest.approx(straight[step], rel=1e-5), f"{label} rank {rank} step {step}"
            assert own > 0 and read == own, f"{label} rank {rank}: read {read} elements of state, holds {own}"
        whole_stage[label] = [own for _, _, own in results]
    # Under FSDP each replica holds (and read) a part of its stage's state, the two parts covering it (each also
    # holds the scalar step counts); at dp=1 a rank holds its stage's whole. Rank r has pp_rank r // 2.
    for stage, whole in enumerate(whole_stage["dp=1"]):
        first, second = whole_stage["fsdp"][2 * stage:2 * stage + 2]
        assert max(first, second) < whole <= first + second, (stage, whole_stage)
