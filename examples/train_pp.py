"""Full fine-tune of a tiny Llama with PipelineTrainer: the Trainer swap in practice.

Launch (CPU):
    torchrun --nproc-per-node 2 examples/train_pp.py
    torchrun --nproc-per-node 4 examples/train_pp.py --pp_size 4
    accelerate launch --multi_gpu --num_processes 2 examples/train_pp.py   (works on CPU too)
Any PipelineTrainingArguments / TrainingArguments flag works (e.g. --pp_schedule gpipe).

What it shows: the only differences from a plain Trainer script are the two
class names and the pp_* arguments. The model (built from a config: no
download) is split over the ranks; the loss printed on rank 0 is the true
loss of the whole batch, and evaluation runs through the pipeline too.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import DataCollatorForLanguageModeling, HfArgumentParser, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import char_tokenizer, corpus_dataset, tiny_llama_config  # noqa: E402

from hf_pp import PipelineTrainer, PipelineTrainingArguments  # noqa: E402

DEFAULTS = dict(
    output_dir="outputs/train_pp", pp_size=2, pp_schedule="1f1b", per_device_train_batch_size=8,
    per_device_eval_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3, max_steps=60,
    warmup_steps=5, lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10, eval_strategy="steps",
    eval_steps=30, save_strategy="no", report_to="none", use_cpu=True, dataloader_drop_last=True, seed=0,
)


def main() -> None:
    parser = HfArgumentParser(PipelineTrainingArguments)
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)

    tokenizer = char_tokenizer()
    data = corpus_dataset(tokenizer).train_test_split(test_size=64, seed=0)
    config = tiny_llama_config(tokenizer)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)

    trainer = PipelineTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
        processing_class=tokenizer,
        # Padding to a multiple of 8 bounds the number of distinct shapes the pipeline sees.
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=8),
    )
    result = trainer.train()
    metrics = trainer.evaluate()
    # One ordinary Hugging Face directory, written by the stages together.
    trainer.save_model(os.path.join(args.output_dir, "final"))
    if trainer.is_world_process_zero():
        print(f"train loss {result.training_loss:.4f}  eval loss {metrics['eval_loss']:.4f}  "
              f"steps {result.global_step}; model saved to {args.output_dir}/final", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        # A process group left alive at interpreter exit can abort in gloo's threads.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
