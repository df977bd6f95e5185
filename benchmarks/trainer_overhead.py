"""PipelineTrainer step time against a bare ``schedule.step`` loop doing the same work.

Both run on the same ranks, model, batch and schedule; each step is forward +
backward over the microbatches, the loss of the Hugging Face model
(``model.loss_function``), clipping over all stages at 1.0, a fused AdamW
step and zeroing of the gradients. What the Trainer adds (data loader, loss
normalisation by label tokens, loss shared by the last stage, checks,
callbacks, scheduler, logging every --logging-steps) is the overhead.

Order: bare, Trainer, bare again (the machine is shared, so the bare figure is
the mean of the two medians). Step time of the Trainer = time between
consecutive ``on_step_end`` callbacks, so it includes fetching the batch.

Usage:
    python benchmarks/trainer_overhead.py             # pp=2, 1F1B, batch 8 x 128, m=8
    python benchmarks/trainer_overhead.py --quick
    python benchmarks/trainer_overhead.py --pp 4 --schedule interleaved_1f1b --batch 16 --microbatches 16
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_layout_args, add_model_args, check_layout_args, check_microbatches, cores, make_batch, median, model_size,
    spawn_ranks, timed_steps, tiny_llama,
)

LR = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_layout_args(parser)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--logging-steps", type=int, default=10, help="Trainer logging cadence (logging reads the loss)")
    parser.add_argument("--quick", action="store_true", help="4 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 2, 4
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "seq", "batch", "steps"), [args.pp])
    check_microbatches(parser, args)
    return args


def _bare_loop(size, args, mesh) -> list[float]:
    import torch

    from hf_pp.functional import pipeline_model
    from hf_pp.grads import clip_grad_norm

    model = tiny_llama(size)
    tokens = args.batch * (size.seq - 1)  # label tokens after the model's shift, as Trainer counts them

    def loss_fn(logits, labels):
        return model.loss_function(logits, labels, size.vocab, num_items_in_batch=tokens)

    schedule, parts, has_first, has_last, _ = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule=args.schedule, pipeline_parallel_schedule_csv=None,
        microbatch_size=args.batch // args.microbatches, local_batch_size=args.batch, device="cpu", loss_fn=loss_fn,
    )
    params = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)  # Trainer's default adamw_torch_fused
    batches = [make_batch(args.batch, size, seed=i)[0] for i in range(4)]
    it = iter(range(10**9))

    def step():
        ids = batches[next(it) % len(batches)]
        losses = []
        schedule.step(*((ids,) if has_first else ()), target=ids if has_last else None, losses=losses,
                      return_outputs=False)
        clip_grad_norm(parts, 1.0, pp_group=mesh.get_group())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.warmup, args.steps)


def _trainer_run(size, args, out_dir) -> list[float]:
    import torch
    from transformers import TrainerCallback

    from hf_pp import PipelineTrainer, PipelineTrainingArguments

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    samples = [{"input_ids": row, "labels": row} for i in range(4) for row in make_batch(args.batch, size, seed=i)[0]]
    targs = PipelineTrainingArguments(
        output_dir=out_dir, pp_size=args.pp, pp_schedule=args.schedule, per_device_train_batch_size=args.batch,
        pp_microbatch_size=args.batch // args.microbatches, max_steps=args.warmup + args.steps + 1, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=args.logging_steps, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = PipelineTrainer(model=tiny_llama(size), args=targs, train_dataset=samples, callbacks=[StepClock()],
                              data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    trainer.train()
    gaps = [b - a for a, b in zip(ends, ends[1:])]  # gap i covers step i + 1 (the first has no start mark)
    return gaps[args.warmup:]


def _worker(rank, world, size, args, out_dir) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    out = {"bare1": median(_bare_loop(size, args, mesh))}
    out["trainer"] = median(_trainer_run(size, args, out_dir))
    out["bare2"] = median(_bare_loop(size, args, mesh))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    size = model_size(args)
    print(f"{size}; pp={args.pp} {args.schedule}, batch {args.batch}, m={args.microbatches} ...", flush=True)
    with tempfile.TemporaryDirectory() as out_dir:  # one for all ranks: they must agree on their arguments
        per_rank = spawn_ranks(_worker, args.pp, size, args, out_dir)
    # Every rank waits for the others each step; the slowest rank's median is the step time.
    bare1, trainer, bare2 = (max(r[k] for r in per_rank) for k in ("bare1", "trainer", "bare2"))
    bare = (bare1 + bare2) / 2
    print(f"\n{datetime.date.today()}, {cores()} CPU cores, median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| loop | step (s) | tokens/s |\n|---|---|---|")
    tok = args.batch * size.seq
    for name, t in (("bare schedule.step (1st run)", bare1), ("bare schedule.step (2nd run)", bare2),
                    ("PipelineTrainer", trainer)):
        print(f"| {name} | {t:.3f} | {tok / t:.0f} |")
    print(f"\nTrainer overhead: {100 * (trainer / bare - 1):+.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
