"""Pipeline efficiency of hf_pp against the bubble bound and the unsplit model.

For every pipeline size, microbatch count and schedule valid for the layout,
the ranks (spawned here, one gloo process and one intra-op thread each, as
``torchrun --nproc-per-node P`` with OMP_NUM_THREADS=1 would start them) run
``schedule.step`` (forward + backward of the whole batch, gradients cleared)
and the median step time after warm-up is compared with the same work done
unsplit on rank 0, timed in rotation with the pipeline (each round: the
unsplit step while the other ranks sleep in a barrier, then a pipeline step),
so load that comes and goes on a shared machine hits both alike:

    ideal      = max(unsplit_1thread * (v*m + p - 1) / (v*m*p), unsplit_1thread / cores)
    efficiency = ideal / measured

(v = stages per rank; v = 1 for GPipe and 1F1B). The second term is the
machine's limit: with fewer cores than ranks no schedule beats unsplit / cores.
A microbatch holds at least one sample: with m above --batch the batch grows to m.

Usage:
    python benchmarks/pipeline_efficiency.py            # full sweep (~19 min on 2 cores)
    python benchmarks/pipeline_efficiency.py --quick    # 1F1B + interleaved, m in {8, 16} (~2 min)
    python benchmarks/pipeline_efficiency.py --pp 2 --microbatches 8 --schedules 1f1b --layers 16 --hidden 512
Writes efficiency.md / .json / .png under --out and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    ModelSize, add_model_args, build_pipeline, check_layout_args, cores, median, model_size, peak_rss_mb,
    reset_peak_rss, spawn_ranks, timed_steps, tiny_llama, unsplit_step,
)


@dataclass(frozen=True)
class Config:
    pp: int
    schedule: str
    m: int
    batch: int
    stages_per_rank: int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="samples per step (at least m)")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=None, help="default: every schedule valid for the layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1F1B and Interleaved1F1B, m in {8, 16}, 3 timed steps")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.microbatches = [m for m in args.microbatches if m in (8, 16)] or args.microbatches[-1:]
        args.schedules = args.schedules or ["1F1B", "Interleaved1F1B"]
        args.warmup, args.steps = 1, 3
    check_layout_args(parser, args, ("layers", "hidden", "vocab", "seq", "batch", "steps"), args.pp)
    for m in args.microbatches:
        if m < 1 or max(args.batch, m) % m:
            parser.error(f"--batch {args.batch} is not divisible into {m} microbatches")
    return args


def plan(args, size: ModelSize) -> tuple[list[Config], list[str]]:
    """Every (pp, schedule, m) the layout allows, and why the others were left out."""
    import torch

    from hf_pp.errors import PipelineConfigError
    from hf_pp.functional import plan_stage_fqns
    from hf_pp.schedules import SCHEDULE_NAMES, resolve_schedule, validate_microbatches

    with torch.device("meta"):
        model = tiny_llama(size)
    try:
        specs = [resolve_schedule(name) for name in (args.schedules or SCHEDULE_NAMES)]
    except PipelineConfigError as exc:
        sys.exit(f"error: {exc}")
    configs, skipped = [], []
    for pp in args.pp:
        for spec in specs:
            for m in args.microbatches:
                batch = max(args.batch, m)
                try:
                    _, ranks = plan_stage_fqns(model, pp, spec)
                    validate_microbatches(spec, batch, batch // m, pp, len(ranks[0]))
                except PipelineConfigError as exc:
                    skipped.append(f"pp={pp} {spec.name} m={m}: {str(exc).split(';')[0]}")
                    continue
                configs.append(Config(pp, spec.name, m, batch, len(ranks[0])))
    if not configs:
        sys.exit("error: no schedule is valid for this layout:\n  " + "\n  ".join(skipped))
    return configs, skipped


def _unsplit_worker(rank, world, size: ModelSize, batches: list[int], warmup: int, steps: int) -> dict:
    """Median step of the unsplit model per batch size, on 1 thread and on every core."""
    import torch

    out = {}
    for batch in batches:
        step = unsplit_step(size, batch)

        row = {}
        for threads in sorted({1, cores()}):
            torch.set_num_threads(threads)
            reset_peak_rss()
            row[threads] = median(timed_steps(step, warmup, steps))
        row["rss_mb"] = peak_rss_mb()
        out[batch] = row
    return out


def _pipeline_worker(rank, world, size: ModelSize, configs: list[Config], warmup: int, steps: int) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    idle = peak_rss_mb()  # torch, transformers and the process group loaded, no model yet
    out = []
    for cfg in configs:
        step, _ = build_pipeline(size, mesh, cfg.schedule, cfg.batch, cfg.m)
        reset_peak_rss()  # the peak of training with this rank's stages, not of building the whole model

        timed_steps(step, warmup, 1, sync=dist.barrier)  # warm-up, then one step for this rank's peak memory
        rss = [None] * world
        dist.all_gather_object(rss, peak_rss_mb())
        step_s, unsplit_s = _rotated_timings(rank, size, cfg, step, max(warmup, 1), steps)
        out.append({**asdict(cfg), "step_s": step_s, "rss_mb": rss, "idle_rss_mb": idle, "same_run_unsplit_s": unsplit_s})
        if rank == 0:
            print(f"  {cfg.schedule} m={cfg.m}: {out[-1]['step_s']:.3f} s", flush=True)
        del step
        gc.collect()
    return out


def _rotated_timings(rank: int, size: ModelSize, cfg: Config, step, warmup: int, steps: int) -> tuple[float, dict]:
    """Median pipeline step (max over ranks) and unsplit steps timed in rotation with it.

    Each round rank 0 first runs the unsplit model on the same batch (on 1 thread, on every core, and on 1 thread
    as the pipeline's m microbatches with gradient accumulation) while the other ranks sleep in a barrier; then
    every rank runs one pipeline step. Load that comes and goes on a shared machine thus hits the pipeline and its
    baselines alike.
    """
    import torch
    import torch.distributed as dist

    variants = [(1, 1), (cores(), 1), (1, cfg.m)]  # (threads, microbatches)
    variants = list(dict.fromkeys(variants))
    run_unsplit = unsplit_step(size, cfg.batch) if rank == 0 else None
    times: dict = {"pipeline": [], **{v: [] for v in variants}}
    for i in range(warmup + steps):
        if run_unsplit is not None:
            for threads, m in variants:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                run_unsplit(m)
                if i >= warmup:
                    times[(threads, m)].append(time.perf_counter() - start)
            torch.set_num_threads(1)
        dist.barrier()
        start = time.perf_counter()
        step()
        if i >= warmup:
            times["pipeline"].append(time.perf_counter() - start)
    del run_unsplit  # its pages are handed back before the next configuration's peak (reset_peak_rss)
    # A step lasts until the slowest rank finishes: the max over ranks of each step.
    pipeline = torch.tensor(times["pipeline"], dtype=torch.float64)
    dist.all_reduce(pipeline, op=dist.ReduceOp.MAX)
    unsplit = {}
    if rank == 0:
        unsplit = {threads: median(times[(threads, 1)]) for threads, m in variants if m == 1}
        unsplit["microbatched"] = median(times[(1, cfg.m)])
    return median(pipeline.tolist()), unsplit


def ideal_time(unsplit: float, p: int, m: int, v: int, n_cores: int) -> float:
    return max(unsplit * (v * m + p - 1) / (v * m * p), unsplit / n_cores)


def report(args, size, results, unsplit, skipped) -> str:
    c = cores()
    lines = [
        f"# Pipeline efficiency ({size}; one thread per rank)",
        f"{datetime.date.today()}, {platform.machine()} with {c} CPU cores, median of {args.steps} steps after "
        f"{args.warmup} warm-up; load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(other work on the machine slows every figure)",
        f"Peak RSS is per rank while training; an idle rank (torch, transformers, process group) holds "
        f"{results[0]['idle_rss_mb']:.0f} MB.",
        "",
        "| pp | schedule | m | batch | step (s) | ideal (s) | efficiency | efficiency, same microbatches | "
        f"vs unsplit 1 thread | vs unsplit {c} threads | tokens/s | peak RSS per rank (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["same_run_unsplit_s"]
        ideal = ideal_time(base[1], r["pp"], r["m"], r["stages_per_rank"], c)
        same_mb = ideal_time(base["microbatched"], r["pp"], r["m"], r["stages_per_rank"], c) / r["step_s"]
        r.update(ideal_s=ideal, efficiency=ideal / r["step_s"], efficiency_same_microbatches=same_mb,
                 tokens_per_s=r["batch"] * size.seq / r["step_s"])
        lines.append(
            f"| {r['pp']} | {r['schedule']} | {r['m']} | {r['batch']} | {r['step_s']:.3f} | {ideal:.3f} | "
            f"{r['efficiency']:.2f} | {same_mb:.2f} | {base[1] / r['step_s']:.2f}x | {base[c] / r['step_s']:.2f}x | "
            f"{r['tokens_per_s']:.0f} | {' / '.join(f'{x:.0f}' for x in r['rss_mb'])} |"
        )
    lines += ["", "The unsplit model, timed on rank 0 in rotation with each pipeline (same rounds, same batch), gives "
              "the ideal and the 'vs unsplit' columns. 'Efficiency, same microbatches' takes as unsplit the batch "
              "run as the pipeline's m microbatches with gradient accumulation: it leaves out what small "
              "microbatches cost in themselves and keeps what the pipeline adds (bubble, imbalance, transfers). "
              "The unsplit model alone in its own process:",
              "", "| unsplit, batch | 1 thread (s) | tokens/s | " f"{c} threads (s) | tokens/s | peak RSS (MB) |",
              "|---|---|---|---|---|---|"]
    for batch, row in sorted(unsplit.items()):
        tok = batch * size.seq
        lines.append(f"| {batch} | {row[1]:.3f} | {tok / row[1]:.0f} | {row[c]:.3f} | {tok / row[c]:.0f} | "
                     f"{row['rss_mb']:.0f} |")
    if skipped:
        lines += ["", "Not valid for the layout (skipped): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(results, path: str, n_cores: int) -> None:
    """Speed-up over the unsplit model divided by p, against the bubble bound (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pps = sorted({r["pp"] for r in results})
    fig, axes = plt.subplots(1, len(pps), figsize=(5.5 * len(pps), 4), squeeze=False)
    for ax, p in zip(axes[0], pps):
        rows = [r for r in results if r["pp"] == p]
        ms = sorted({r["m"] for r in rows})
        for v in sorted({r["stages_per_rank"] for r in rows}):
            bound = [min(v * m / (v * m + p - 1), n_cores / p) for m in ms]
            ax.plot(ms, bound, "k--" if v == 1 else "k:", label=f"bound, {v} stage(s)/rank")
        for name in dict.fromkeys(r["schedule"] for r in rows):
            pts = sorted((r["m"], r["unsplit_s"] / (p * r["step_s"])) for r in rows if r["schedule"] == name)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("microbatches m")
        ax.set_ylabel("unsplit time / (p x step time)")
        ax.set_title(f"pp={p} on {n_cores} cores")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    size = model_size(args)
    configs, skipped = plan(args, size)
    args.load_before = os.getloadavg()[0]
    batches = sorted({c.batch for c in configs})
    print(f"{size}; {len(configs)} runs; measuring the unsplit model on batches {batches} ...", flush=True)
    (unsplit,) = spawn_ranks(_unsplit_worker, 1, size, batches, args.warmup, args.steps)
    results = []
    for pp in sorted({c.pp for c in configs}):
        mine = [c for c in configs if c.pp == pp]
        print(f"pp={pp}: {len(mine)} runs ...", flush=True)
        results += spawn_ranks(_pipeline_worker, pp, size, mine, args.warmup, args.steps)[0]
    for r in results:
        r["unsplit_s"] = r["same_run_unsplit_s"][1]
    table = report(args, size, results, unsplit, skipped)
    print(table, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "efficiency.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "efficiency.json"), "w") as f:
        json.dump({"args": vars(args), "unsplit": unsplit, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "efficiency.png"), cores())
    print(f"wrote {args.out}/efficiency.md, .json, .png")


if __name__ == "__main__":
    main()
