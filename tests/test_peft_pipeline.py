"""PEFT adapters across pipeline stages: same training as Trainer + PEFT, exported as a normal adapter."""

import os

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from distributed import run_distributed
from hf_pp import PipelineTrainer, PipelineTrainingArguments
from trainer_fixtures import CountingDataset, pad_collator, tiny_llama

COMMON = dict(
    max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_grad_norm=0.5,
    learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    disable_tqdm=True,
)

ADAPTERS = {
    "lora_all_linear": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    "dora_head": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                    modules_to_save=["lm_head"]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # On a model with tied input/output embeddings (frozen: they must get no gradient).
    "lora_tied_model": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
}


def peft_llama(kind: str, num_layers: int = 4):
    model = tiny_llama(num_layers, tie=kind == "lora_tied_model")
    torch.manual_seed(1)  # the same adapter initialisation in every process
    return get_peft_model(model, ADAPTERS[kind]())


def _trainable(model) -> dict:
    return {n.replace("base_model.model.", "", 1): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(kind, output_dir):
    model = peft_llama(kind)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=output_dir, **COMMON),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], _trainable(model)


def _pipeline_worker(rank, world_size, output_dir, kinds, schedule):
    results = {}
    for kind in kinds:
        args = PipelineTrainingArguments(output_dir=output_dir, pp_size=world_size, pp_schedule=schedule, **COMMON)
        trainer = PipelineTrainer(model=peft_llama(kind), args=args, train_dataset=CountingDataset(),
                                  data_collator=pad_collator)
        trainer.train()
        trainable = {n: p.detach().clone() for n, p in trainer.model.original_named_parameters() if p.requires_grad}
        frozen_with_grad = [n for n, p in trainer.model.original_named_parameters() if not p.requires_grad and p.grad is not None]
        optimized = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
        adapter_dir = os.path.join(output_dir, f"adapter-{kind}")
        trainer.save_model(adapter_dir)
        results[kind] = dict(logs=[h for h in trainer.state.log_history if "loss" in h], trainable=trainable,
                             frozen_with_grad=frozen_with_grad, optimized=optimized, adapter_dir=adapter_dir)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size,schedule", [(2, "1f1b"), (4, "1f1b"), (2, "interleaved_1f1b")])
def test_peft_pipeline_matches_trainer_and_exports_a_normal_adapter(tmp_path, world_size, schedule):
    kinds = list(ADAPTERS) if world_size == 2 and schedule == "1f1b" else ["lora_all_linear"]
    per_rank = run_distributed(_pipeline_worker, world_size, str(tmp_path), kinds, schedule, timeout_s=600)
    for kind in kinds:
        ref_logs, ref_trainable = _reference(kind, str(tmp_path / f"ref-{kind}"))
        seen = {}
        for rank, out in enumerate(per_rank):
            r = out[kind]
            for key in ("loss", "grad_norm"):
                torch.testing.assert_close(torch.tensor([h[key] for h in r["logs"]]),
                                           torch.tensor([h[key] for h in ref_logs]), rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{kind} rank {rank} {key}: {m}")
            assert r["frozen_with_grad"] == [], f"{kind}: frozen base weights got gradients"
            assert r["optimized"] == len(r["trainable"]), f"{kind}: optimizer holds non-adapter parameters"
            seen.update(r["trainable"])
        assert sorted(seen) == sorted(ref_trainable), f"{kind}: adapters missing from the stages"
        # atol 1e-5 as in test_trainer_parity: Adam divides by sqrt(v), so float reassociation in a
        # near-zero gradient element can move that weight by a few 1e-6 (losses above are rtol 1e-5).
        for name, value in seen.items():
            torch.testing.assert_close(value, ref_trainable[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} {name}: {m}")
        # The exported directory is an ordinary adapter: load it in this process onto a fresh base model.
        loaded = PeftModel.from_pretrained(tiny_llama(tie=kind == "lora_tied_model"), per_rank[0][kind]["adapter_dir"])
        loaded_trainable = {n.replace("base_model.model.", "", 1): p for n, p in loaded.named_parameters()
                            if any(t in n for t in ("lora_", "ia3_", "modules_to_save"))}
        for name, value in ref_trainable.items():
            torch.testing.assert_close(loaded_trainable[name], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} loaded {name}: {m}")


def _dp_peft_worker(rank, world_size, output_dir, mode):
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, pp_data_parallel=mode, **COMMON)
    trainer = PipelineTrainer(model=peft_llama("lora_all_linear"), args=args, train_dataset=CountingDataset(),
                              data_collator=pad_collator)
    trainer.train()
    adapter_dir = os.path.join(output_dir, f"adapter-{mode}")
    trainer.save_model(adapter_dir)
    return [h for h in trainer.state.log_history if "loss" in h], adapter_dir


@pytest.mark.slow
def test_lora_with_pp2_x_dp2_fsdp_matches_trainer_on_the_global_batch(tmp_path):
    model = peft_llama("lora_all_linear")
    ref_args = {**COMMON, "per_device_train_batch_size": 2 * COMMON["per_device_train_batch_size"]}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "ref"), **ref_args),
                      train_dataset=CountingDataset(), data_collator=pad_collator)
    trainer.train()
    ref_logs, ref_trainable = [h for h in trainer.state.log_history if "loss" in h], _trainable(model)
    for logs, adapter_dir in run_distributed(_dp_peft_worker, 4, str(tmp_path), "fsdp", timeout_s=600):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([h[key] for h in logs]), torch.tensor([h[key] for h in ref_logs]),
                                       rtol=1e-5, atol=1e-7)
    loaded = PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    for name, value in loaded.named_parameters():
        short = name.replace("base_model.model.", "", 1)
        if "lora_" in name:
            torch.testing.assert_close(value, ref_trainable[short], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
