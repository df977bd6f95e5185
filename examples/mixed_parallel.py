"""Pipeline x data parallelism: 2 pipeline stages x 2 FSDP2 replicas on 4 ranks.

Launch (CPU):
    torchrun --nproc-per-node 4 examples/mixed_parallel.py                       # pp=2 x dp=2, FSDP inside stages
    torchrun --nproc-per-node 4 examples/mixed_parallel.py --pp_data_parallel ddp

What it shows: world size = pp_size x dp_size. Ranks r = pp_rank * dp_size + dp_rank
(`hf_pp.mesh.build_world_mesh`): each pipeline reads its own share of every
global batch, and FSDP2 shards each stage's weights over the replicas
(pp_data_parallel="fsdp"; "ddp" keeps whole copies and averages gradients once
per optimizer step). Your own hook: PipelineTrainer(parallelize_fn=...).
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
    output_dir="outputs/mixed", pp_size=2, pp_data_parallel="fsdp", per_device_train_batch_size=4,
    gradient_accumulation_steps=2, learning_rate=3e-3, max_steps=20, warmup_steps=2, max_grad_norm=1.0,
    logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_drop_last=True,
)


def main() -> None:
    parser = HfArgumentParser(PipelineTrainingArguments)
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=64, num_layers=4)
    torch.manual_seed(args.seed)
    trainer = PipelineTrainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=corpus_dataset(tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=8),
    )
    pp = trainer._pp
    print(f"[rank {trainer.args.process_index}] pp_rank {pp.pp_rank} dp_rank {pp.dp_rank} stages {pp.stage_ids} "
          f"({args.pp_data_parallel})", flush=True)
    result = trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))
    if trainer.is_world_process_zero():
        print(f"train loss {result.training_loss:.4f} over {result.global_step} steps; "
              f"total batch {trainer.get_total_train_batch_size(args)}; saved {args.output_dir}/final", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        # A process group left alive at interpreter exit can abort in gloo's threads.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
