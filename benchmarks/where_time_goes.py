"""Where a pipeline step's time goes, rank by rank.

Each rank (spawned here: one gloo process and one intra-op thread each, as
``OMP_NUM_THREADS=1 torchrun --nproc-per-node P`` would start them) runs
``schedule.step`` (forward + backward of the batch, gradients cleared) on the
benchmark Llama and reports:

- the first step (it includes torch's shape inference and first allocations)
  against the median later step;
- how much of a step the rank's main thread computes (CPU time) and how much it
  waits (blocked in a receive, or runnable but without a free core);
- what the computing time is spent on, from ``torch.profiler`` self times:
  matmuls, attention, other tensor ops, the autograd engine, posting sends and
  receives, and the rest (Python: Hugging Face module code, the schedule's own
  logic), scaled to the unprofiled step;
- CPU time of the process's other threads (gloo moves the bytes there).

How to read it: every rank waits for about the schedule's bubble,
(p - 1) / (v*m + p - 1) of the step (printed above the table; v = stages per
rank), and the lighter ranks also wait for the heaviest one. The profiler's op
times are wall-clock, so on a busy machine (other processes preempting the
ranks) the split of the computing time is approximate.

Usage:
    python benchmarks/where_time_goes.py                    # pp=2, 1F1B, batch 8 x 128, m=8
    python benchmarks/where_time_goes.py --pp 4 --batch 16 --microbatches 16
    python benchmarks/where_time_goes.py --schedule interleaved_1f1b --trace-dir /tmp/traces   # + Chrome traces
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
    ModelSize, add_layout_args, add_model_args, build_pipeline, check_layout_args, check_microbatches, cores, median,
    model_size, spawn_ranks, tiny_llama,
)

CATEGORIES = ("matmul", "attention", "other tensor ops", "autograd engine", "send/recv posting", "Python and the rest")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_layout_args(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled ones")
    parser.add_argument("--trace-dir", default=None, help="write one Chrome trace per rank here")
    args = parser.parse_args(argv)
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "seq", "batch", "steps"), [args.pp])
    check_microbatches(parser, args)
    _check_schedule(parser, args)
    return args


def _check_schedule(parser, args) -> None:
    """The schedule must exist and accept this layout: say so before any rank starts."""
    import torch

    from hf_pp.errors import PipelineConfigError
    from hf_pp.functional import plan_stage_fqns
    from hf_pp.schedules import resolve_schedule, validate_microbatches

    with torch.device("meta"):
        model = tiny_llama(model_size(args))
    try:
        spec = resolve_schedule(args.schedule)
        _, ranks = plan_stage_fqns(model, args.pp, spec)
        validate_microbatches(spec, args.batch, args.batch // args.microbatches, args.pp, len(ranks[0]))
    except PipelineConfigError as exc:
        parser.error(str(exc))


def category(key: str) -> str:
    """The category of one profiler event name (see CATEGORIES)."""
    if key in _MATMULS:
        return "matmul"
    if "scaled_dot_product" in key or "flash_attention" in key:
        return "attention"
    if key.startswith(("c10d::", "gloo:")):
        return "send/recv posting"
    if key.startswith("autograd::") or "Backward" in key or key.endswith("AccumulateGrad"):
        return "autograd engine"
    if key.startswith("aten::"):
        return "other tensor ops"
    return "Python and the rest"


def _worker(rank, world, size: ModelSize, args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    step, stages = build_pipeline(size, mesh, args.schedule, args.batch, args.microbatches)

    def measured(n: int) -> list[tuple[float, float, float]]:
        """(wall, main-thread CPU, process CPU) of n steps, every rank starting together."""
        rows = []
        for _ in range(n):
            dist.barrier()
            wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
            step()
            rows.append((time.perf_counter() - wall, time.thread_time() - thread, time.process_time() - process))
        return rows

    (first,) = measured(1)
    measured(max(args.warmup - 1, 0))
    plain = measured(args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = measured(args.steps)
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.trace_dir, f"rank{rank}.json"))
    # The profiler slows every op; keep its proportions and scale them to the unprofiled step.
    busy_profiled = sum(r[1] for r in profiled) / args.steps
    split = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        split[category(event.key)] += event.self_cpu_time_total / 1e6 / args.steps
    # Op times are wall-clock: when they add up to more than the thread's CPU time, ops were preempted, and the
    # time outside ops (Python) cannot be told apart.
    rest = busy_profiled - sum(split.values())
    split["Python and the rest"] += max(rest, 0.0)
    # A step lasts until the slowest rank finishes: the max over ranks of each step.
    walls = torch.tensor([r[0] for r in plain], dtype=torch.float64)
    dist.all_reduce(walls, op=dist.ReduceOp.MAX)
    busy = median([r[1] for r in plain])
    total = sum(split.values()) or 1.0
    return {
        "rank": rank, "stages": [s.stage_index for s in stages], "first_s": first[0], "step_s": median(walls.tolist()),
        "busy_s": busy, "other_threads_s": median([r[2] - r[1] for r in plain]),
        "split_s": {k: v / total * busy for k, v in split.items()}, "preempted": rest < 0,
    }


def report(args, size: ModelSize, rows: list[dict]) -> str:
    step = rows[0]["step_s"]
    v, m, p = len(rows[0]["stages"]), args.microbatches, args.pp
    lines = [
        f"# Where the time goes: pp={args.pp}, {args.schedule}, batch {args.batch}, m={args.microbatches} ({size})",
        f"{datetime.date.today()}, {platform.machine()} with {cores()} CPU cores, one thread per rank; median of "
        f"{args.steps} steps; load average {os.getloadavg()[0]:.1f}. Step (max over ranks): {step:.3f} s. "
        f"Bubble of the schedule: {(p - 1) / (v * m + p - 1):.1%} of the step per rank.",
        "",
        "| rank | stages | first step (s) | computing | waiting | " + " | ".join(CATEGORIES) + " | other threads |",
        "|---" * (6 + len(CATEGORIES)) + "|",
    ]
    for r in rows:
        wait = max(step - r["busy_s"], 0.0)
        parts = " | ".join("n/a" if c == "Python and the rest" and r["preempted"] else f"{r['split_s'][c] / step:.1%}"
                           for c in CATEGORIES)
        lines.append(f"| {r['rank']} | {', '.join(map(str, r['stages']))} | {r['first_s']:.3f} | "
                     f"{r['busy_s'] / step:.1%} | {wait / step:.1%} | {parts} | {r['other_threads_s'] / step:.1%} |")
    lines += ["", "Shares are of the step time. 'waiting' is the main thread blocked (a receive not yet arrived, a "
              "barrier) or without a free core; 'other threads' is CPU time outside the main thread (gloo's "
              "transfers), on top of the step. 'n/a': the ops' wall-clock times exceed the thread's CPU time (other "
              "processes preempted the rank), so the time outside ops cannot be told apart."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    size = model_size(args)
    rows = spawn_ranks(_worker, args.pp, size, args)
    print(report(args, size, rows), flush=True)
    if args.trace_dir:
        print(f"wrote {args.trace_dir}/rank*.json (open in chrome://tracing or ui.perfetto.dev)")


if __name__ == "__main__":
    main()
