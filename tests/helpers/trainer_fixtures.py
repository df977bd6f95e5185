"""Tiny causal LMs, a generated variable-length dataset and a padding collator
for the trainer tests (no downloads)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

PAD = 0


def tiny_llama(num_layers: int = 4, tie: bool = False, seed: int = 0, vocab_size: int = 64,
               attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A tiny Llama with the attention users get by default (sdpa); eager where a test is about it."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=PAD,
        attn_implementation=attn_implementation, use_cache=False,
    )
    return LlamaForCausalLM(config)


class CountingDataset(Dataset):
    """Sequences that count upward mod vocab from a random start, with random lengths."""

    def __init__(self, size: int = 64, min_len: int = 5, max_len: int = 12, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            start = int(torch.randint(1, vocab, (1,), generator=g))
            ids = [(start + i) % (vocab - 1) + 1 for i in range(length)]
            self.items.append({"input_ids": ids})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collator(features):
    """Right-pad to the longest sequence of the batch: the length changes from batch to batch."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, : len(f["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_pipeline_losses(output_dir: str, common: dict, data_collator=pad_collator, **overrides) -> list[float]:
    """Logged losses of a 2-stage PipelineTrainer LoRA run (r=4, all-linear) with these training arguments."""
    from peft import LoraConfig, get_peft_model

    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    args = PipelineTrainingArguments(output_dir=output_dir, pp_size=2, **common, **overrides)
    trainer = PipelineTrainer(model=model, args=args, train_dataset=CountingDataset(), data_collator=data_collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
