"""Supervised fine-tuning with TRL across pipeline stages: PipelineSFTTrainer in place of SFTTrainer.

Launch (CPU; needs `pip install hf_pp[trl]`, which `make setup` installs):
    torchrun --nproc-per-node 2 examples/sft_trl.py
    torchrun --nproc-per-node 2 examples/sft_trl.py --packing true   (packed rows, documents kept apart)
    torchrun --nproc-per-node 4 examples/sft_trl.py --pp_size 4 --pp_schedule 1f1b
Any PipelineSFTConfig / SFTConfig flag works (e.g. --loss_type dft, --pp_schedule interleaved_1f1b).

What it shows: a TRL script with two class names changed (SFTTrainer -> PipelineSFTTrainer, SFTConfig ->
PipelineSFTConfig) and the pp_* flags. The data are prompt-completion pairs ("7 times 8 is" ->
" 56."), so TRL trains on the completions only; TRL's metrics (mean_token_accuracy, entropy, num_tokens)
are logged as SFTTrainer logs them. The model is built from a config (no download); `save_model` writes
one Hugging Face directory, which rank 0 reloads in this process to complete new prompts.
"""

from __future__ import annotations

import os
import random
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import char_tokenizer, decode_chars, tiny_llama_config  # noqa: E402

from hf_pp import PipelineSFTConfig, PipelineSFTTrainer  # noqa: E402

DEFAULTS = dict(
    output_dir="outputs/sft", pp_size=2, pp_schedule="1f1b", per_device_train_batch_size=16,
    learning_rate=3e-3, max_steps=150, warmup_steps=10, lr_scheduler_type="cosine", max_grad_norm=1.0,
    logging_steps=25, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
    dataloader_drop_last=True, max_length=32,
)
PROMPTS = ["3 times 4 is", "7 times 8 is", "2 times 9 is"]


def multiplication_pairs(count: int = 800, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(count)]
    return Dataset.from_dict({"prompt": [f"{a} times {b} is" for a, b in pairs],
                              "completion": [f" {a * b}." for a, b in pairs]})


def complete(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return decode_chars(tokenizer, out[0, ids.shape[1]:])


def main() -> None:
    parser = HfArgumentParser(PipelineSFTConfig)
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)

    tokenizer = char_tokenizer()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, num_layers=4))
    trainer = PipelineSFTTrainer(model=model, args=args, train_dataset=multiplication_pairs(),
                                 processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))  # every rank: the stages write one directory
    if trainer.is_world_process_zero():
        logged = [h for h in trainer.state.log_history if "loss" in h]
        print(f"loss {logged[0]['loss']:.4f} -> {logged[-1]['loss']:.4f}  mean_token_accuracy "
              f"{logged[0]['mean_token_accuracy']:.3f} -> {logged[-1]['mean_token_accuracy']:.3f}", flush=True)
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(args.output_dir, "final")).eval()
        for prompt in PROMPTS:
            print(f"{prompt!r} -> {complete(reloaded, tokenizer, prompt)!r}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    try:
        main()
    finally:
        # A process group left alive at interpreter exit can abort in gloo's threads.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
