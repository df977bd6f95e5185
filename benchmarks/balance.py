"""Step time of a pipeline cut by ``pp_balance`` = "layers", "auto", "params" and "time".

Two Llamas: one with a large vocabulary (default vocab 32768, hidden 256,
8 layers), where the embeddings and above all the LM head + loss make the end
stages heavy, and a uniform one (vocab 1024), where every cut should give the
same time. For each pp size the ranks (spawned here, one gloo process and one
intra-op thread each, as ``OMP_NUM_THREADS=1 torchrun`` would) build one
``AutoPipeline`` per mode (1F1B, microbatch 1, 4 x pp microbatches unless --batch says) and time their steps in
rotation (layers, auto, params, time; then auto, params, time, layers; ...), so load
changes on the machine hit every mode alike; a step is forward + backward of the batch, the max over
ranks, and the table gives the median.

Usage:
    python benchmarks/balance.py                 # pp {2, 4}, both models, batch 4 x pp (~7 min on 2 cores)
    python benchmarks/balance.py --pp 2 --steps 5 --vocab 50000
    python benchmarks/balance.py --pp 2 --modes layers auto time
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    ModelSize, add_model_args, check_layout_args, cores, make_batch, median, model_size, spawn_ranks, sum_ce_loss, timed_steps,
    tiny_llama, unsplit_step,
)

MODES = ("layers", "auto", "params", "time")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, vocab=32768, vocab_help="vocabulary of the large-vocabulary model")
    parser.add_argument("--uniform-vocab", type=int, default=1024, help="vocabulary of the uniform model")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per step = microbatches (microbatch 1); default 4 x pp, so the fill and drain "
                             "of 1F1B (p - 1 of m + p - 1 slots) do not hide how the stages are cut")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="pp_balance modes to time (default all); 'layers' is always timed, as the baseline")
    args = parser.parse_args(argv)
    args.modes = tuple(dict.fromkeys(["layers", *args.modes]))  # the baseline first, each mode once
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "uniform_vocab", "seq", "steps"), args.pp)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    if args.batch is not None and args.batch < max(args.pp):
        parser.error(f"--batch {args.batch}: 1F1B needs at least pp ({max(args.pp)}) microbatches")
    return args


def _worker(rank, world, sizes: dict, batch: int, warmup: int, steps: int, modes: tuple[str, ...]) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hf_pp import AutoPipeline

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    out = {}
    for name, size in sizes.items():
        ids, labels = make_batch(batch, size)
        built = {}
        for mode in modes:
            ap = AutoPipeline(mesh, pp_schedule="1f1b", pp_microbatch_size=1, pp_batch_size=batch,
                              dp_axis_names=None, pp_balance=mode, pp_balance_seq_len=size.seq)
            built[mode] = ap.build(tiny_llama(size), loss_fn=sum_ce_loss(batch * size.seq))
        times = {mode: [] for mode in modes}
        for i in range(warmup + steps):
            # In rotation, starting one mode later each round: load changes and whatever the mode timed
            # first gains or loses hit every mode alike.
            for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                ap = built[mode]
                dist.barrier()
                start = time.perf_counter()
                ap.step(ids, target=labels, return_outputs=False)
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                for part in ap.parts:
                    part.zero_grad(set_to_none=True)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step lasts until the slowest rank is done
                if i >= warmup:
                    times[mode].append(elapsed.item())
        layers = {}
        for mode, ap in built.items():
            mine = sorted({int(n.split(".")[2]) for part in ap.parts for n, _ in part.named_parameters()
                           if n.startswith("model.layers.")})
            gathered = [None] * world
            dist.all_gather_object(gathered, len(mine))
            layers[mode] = gathered
        out[name] = {mode: {"step_s": median(times[mode]), "layers": layers[mode]} for mode in modes}
        del built
    return out


def _unsplit_worker(rank, world, sizes: dict, batch: int, warmup: int, steps: int) -> dict:
    """Median step of each model unsplit, one process, one thread: the work a perfect split would divide."""
    out = {}
    for name, size in sizes.items():
        out[name] = median(timed_steps(unsplit_step(size, batch), warmup, steps))
    return out


def batch_for(args, pp: int) -> int:
    """Samples per step (= microbatches) at this pipeline size: --batch, or 4 x pp."""
    return args.batch if args.batch is not None else 4 * pp


def ideal_time(unsplit: float, p: int, m: int, n_cores: int) -> float:
    """A perfectly balanced 1F1B pipeline: the bubble bound, or the cores' limit when ranks outnumber cores."""
    return max(unsplit * (m + p - 1) / (m * p), unsplit / n_cores)


def report(args, sizes: dict, results: dict, unsplit: dict) -> str:
    lines = [
        f"# pp_balance: step time by where the layers are cut (1F1B, {args.seq} tokens per sample, "
        "microbatch 1, one thread per rank)",
        f"{datetime.date.today()}, {platform.machine()} with {cores()} CPU cores, median of {args.steps} steps after "
        f"{args.warmup} warm-up, modes timed in rotation; load average {args.load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after",
        "",
        "Ideal: a perfectly balanced split, max(unsplit x (m+p-1)/(m x p), unsplit / cores), unsplit = the batch "
        "in one process on one thread (" + ", ".join(f"{name}, batch {batch}: {t:.3f} s"
                                               for (name, batch), t in unsplit.items()) + ").",
        "",
        "| model | pp | batch = m | pp_balance | layers per stage | step (s) | speed-up over layers | ideal (s) | "
        "step / ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pp, per_model in sorted(results.items()):
        batch = batch_for(args, pp)
        for name, rows in per_model.items():
            base = rows["layers"]["step_s"]
            ideal = ideal_time(unsplit[(name, batch)], pp, batch, cores())
            for mode in args.modes:
                r = rows[mode]
                lines.append(f"| {name} ({sizes[name]}) | {pp} | {batch} | {mode} | {' / '.join(map(str, r['layers']))} | "
                             f"{r['step_s']:.3f} | {base / r['step_s']:.2f}x | {ideal:.3f} | {r['step_s'] / ideal:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = {
        "large vocab": model_size(args),
        "uniform": ModelSize(args.layers, args.hidden, args.uniform_vocab, args.seq),
    }
    args.load_before = os.getloadavg()[0]
    print("unsplit ...", flush=True)
    unsplit = {}
    for batch in sorted({batch_for(args, pp) for pp in args.pp}):
        (times,) = spawn_ranks(_unsplit_worker, 1, sizes, batch, args.warmup, args.steps)
        unsplit.update({(name, batch): t for name, t in times.items()})
    results = {}
    for pp in args.pp:
        print(f"pp={pp}, batch {batch_for(args, pp)} ...", flush=True)
        results[pp] = spawn_ranks(_worker, pp, sizes, batch_for(args, pp), args.warmup, args.steps, args.modes)[0]
    print(report(args, sizes, results, unsplit), flush=True)


if __name__ == "__main__":
    main()
