"""LoRA fine-tune across 2 pipeline stages, then load the adapter in one process and generate.

Launch (CPU):
    torchrun --nproc-per-node 2 examples/finetune_lora.py --base_model outputs/base
    (`make demo` first trains that small base model with examples/train_pp.py)
Without --base_model the base is randomly initialised: the loss still falls,
but the generation is gibberish.

What it shows: the PEFT user story, teaching the base model a new task
(multiplication lines, generated here). PipelineTrainer gets the base
model's directory and a LoraConfig: each rank reads only its stages' weights
(per-stage loading), puts each LoRA adapter on the stage of the layer it
adapts, trains only the adapters,
and `save_model` writes one ordinary adapter directory. Rank 0 then reloads
it with `PeftModel.from_pretrained` in this process and completes prompts.
Outputs: adapter dir, schedule.png (the pipeline schedule), loss.png.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, HfArgumentParser, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import char_tokenizer, decode_chars, lines_dataset, multiplication_lines, tiny_llama_config  # noqa: E402

from hf_pp import PipelineTrainer, PipelineTrainingArguments  # noqa: E402

DEFAULTS = dict(
    output_dir="outputs/lora", pp_size=2, pp_schedule="1f1b", per_device_train_batch_size=8,
    gradient_accumulation_steps=1, learning_rate=1e-2, max_steps=80, warmup_steps=5, lr_scheduler_type="cosine",
    max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    dataloader_drop_last=True,
)
PROMPTS = ["3 times 4 is", "7 times 8 is", "2 times 9 is"]


def base_model(path: str | None, tokenizer) -> LlamaForCausalLM:
    if path and os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path)
    return LlamaForCausalLM(tiny_llama_config(tokenizer))


def plot_losses(log_history: list[dict], filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    losses = [h["loss"] for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="o")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="LoRA fine-tune over 2 pipeline stages")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def generate(base_path: str | None, adapter_dir: str, tokenizer) -> None:
    """One process, no pipeline: the saved adapter on a fresh copy of the base model."""
    model = PeftModel.from_pretrained(base_model(base_path, tokenizer), adapter_dir).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        print(f"  {prompt!r} -> {decode_chars(tokenizer, out[0, ids.shape[1]:].tolist())!r}", flush=True)


def main() -> None:
    parser = HfArgumentParser(PipelineTrainingArguments)
    parser.add_argument("--base_model", default=None, help="directory of a saved base model (else random init)")
    parser.set_defaults(**DEFAULTS)
    args, extra = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)

    tokenizer = char_tokenizer()
    # The new skill for the adapter: multiplication, which the base corpus never shows.
    data = lines_dataset(tokenizer, multiplication_lines())
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    # Given the base model's directory, each rank builds the model on the meta device and reads only its
    # own stages' weights (the way to fine-tune models larger than one machine); LoRA goes on before the split.
    has_base = bool(extra.base_model) and os.path.isdir(extra.base_model)
    model = extra.base_model if has_base else base_model(None, tokenizer)
    trainer = PipelineTrainer(
        model=model, args=args, peft_config=lora, train_dataset=data, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=8),
    )
    if trainer.is_world_process_zero():
        params = dict(trainer.model.original_named_parameters())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        print(f"rank 0's stages: {trainable:,} trainable of {sum(p.numel() for p in params.values()):,} parameters")
        print("schedule picture:", trainer.visualize_current_schedule(os.path.join(args.output_dir, "schedule.png")), flush=True)
    trainer.train()
    adapter_dir = os.path.join(args.output_dir, "adapter")
    trainer.save_model(adapter_dir)
    if trainer.is_world_process_zero():
        plot_losses(trainer.state.log_history, os.path.join(args.output_dir, "loss.png"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        first, last = losses[0], losses[-1]
        print(f"loss {first:.3f} -> {last:.3f}; adapter saved to {adapter_dir}; loss curve in {args.output_dir}/loss.png")
        print("generation with the reloaded adapter (one process):", flush=True)
        generate(extra.base_model, adapter_dir, tokenizer)
    dist.barrier()


if __name__ == "__main__":
    try:
        main()
    finally:
        # A process group left alive at interpreter exit can abort in gloo's threads.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
