"""A sequence classifier across 2 pipeline stages: LlamaForSequenceClassification with PipelineTrainer.

Launch (CPU):
    torchrun --nproc-per-node 2 examples/classify_pp.py
    torchrun --nproc-per-node 2 examples/classify_pp.py --pp_schedule interleaved_1f1b

What it shows: a classification fine-tune (here: which operation an
arithmetic line states, "times", "plus" or "minus"; generated, no download)
is the same Trainer script as for a causal LM. The last stage holds the
``score`` head and reads each row at its last non-pad token; accuracy comes
from an ordinary ``compute_metrics``. ``save_model`` writes one Hugging Face
directory, and rank 0 reloads it with ``AutoModelForSequenceClassification``
in this process and classifies new lines.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification, DataCollatorWithPadding, HfArgumentParser, LlamaForSequenceClassification,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import char_tokenizer, tiny_llama_config  # noqa: E402

from hf_pp import PipelineTrainer, PipelineTrainingArguments  # noqa: E402

DEFAULTS = dict(
    output_dir="outputs/classify", pp_size=2, pp_schedule="1f1b", per_device_train_batch_size=8,
    per_device_eval_batch_size=8, learning_rate=3e-3, max_steps=60, warmup_steps=5, lr_scheduler_type="cosine",
    max_grad_norm=1.0, logging_steps=10, eval_strategy="steps", eval_steps=30, save_strategy="no", report_to="none",
    use_cpu=True, dataloader_drop_last=True, seed=0,
)
OPERATIONS = {"times": lambda a, b: a * b, "plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
NEW_LINES = ["6 plus 3 is 9.", "4 times 5 is 20.", "9 minus 2 is 7."]


def operation_lines(seed: int, count: int) -> list[tuple[str, int]]:
    """("a <op> b is c.", index of op) pairs; the label is the operation."""
    rng = random.Random(seed)
    names = list(OPERATIONS)
    lines = []
    for _ in range(count):
        a, b, label = rng.randint(1, 9), rng.randint(1, 9), rng.randrange(len(names))
        lines.append((f"{a} {names[label]} {b} is {OPERATIONS[names[label]](a, b)}.", label))
    return lines


def encode(tokenizer, lines: list[tuple[str, int]]) -> Dataset:
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in lines]
    return Dataset.from_dict({"input_ids": ids, "labels": [label for _, label in lines]})


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    parser = HfArgumentParser(PipelineTrainingArguments)
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)

    tokenizer = char_tokenizer()
    config = tiny_llama_config(tokenizer, num_layers=4)
    config.num_labels, config.id2label = len(OPERATIONS), dict(enumerate(OPERATIONS))
    config.label2id = {name: i for i, name in config.id2label.items()}
    torch.manual_seed(args.seed)
    model = LlamaForSequenceClassification(config)  # needs config.pad_token_id: rows are read at their last token

    trainer = PipelineTrainer(
        model=model, args=args, train_dataset=encode(tokenizer, operation_lines(0, 480)),
        eval_dataset=encode(tokenizer, operation_lines(1, 96)), processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8), compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f}  eval accuracy {metrics['eval_accuracy']:.3f}", flush=True)
        # The saved directory is an ordinary one: one process, the whole model.
        reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
        batch = tokenizer(NEW_LINES, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            predicted = reloaded(**batch).logits.argmax(-1).tolist()
        for line, label in zip(NEW_LINES, predicted):
            print(f"{line!r} -> {reloaded.config.id2label[label]}", flush=True)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
