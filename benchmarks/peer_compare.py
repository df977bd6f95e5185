"""hf_pp's AutoPipeline against a peer's (NeMo AutoModel) on the same work, alternated in one run.

Both sides train the benchmark Llama (same config, same seed, so the same
weights; the same batch and the same summed cross entropy) with their
``AutoPipeline`` at its defaults: 1F1B, microbatch 1, one gloo process and
one intra-op thread per rank. hf_pp never imports the peer: each side runs
in its own processes, started with its own virtual environment's python
(``--peer-venv``), and stays alive between rounds, idle (blocked on its
control pipe, or in a collective) while the other side runs. Each round
times ``--steps`` steps of one side, then of the other, the order swapped every round (A, B, B, A, ...); a
step is forward + backward of the batch plus clearing the gradients, the max
over ranks, and a round's figure is its median. The ratio hf_pp / peer is
taken per round and the table shows the median of the rounds' ratios, then
every round's ratio. Before any timing each side reports its first loss:
equal losses show that both ran the same work. With ``--profile`` each side
also runs as many profiled steps and prints where each rank's time goes
(the categories of ``where_time_goes.py``) and its top ops.

Usage:
    python benchmarks/peer_compare.py --peer-venv /work/nemo-venv        # the issue's three cases (~6 min)
    python benchmarks/peer_compare.py --peer-venv VENV --cases 2,8,1024 --rounds 5 --profile
A case is PP,MICROBATCHES,VOCAB (batch = microbatches, one sample each).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import (  # noqa: E402
    ModelSize, add_model_args, cores, free_port, make_batch, median, sum_ce_loss, tiny_llama,
)

SIDES = ("hf_pp", "peer")
_TAG = "@@ "  # marks the serving rank's replies on stdout (libraries may print too)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--peer-venv", help="the peer's virtual environment (its bin/python runs the peer side)")
    parser.add_argument("--cases", nargs="+", default=["2,8,1024", "2,8,32768", "4,16,1024"],
                        help="PP,MICROBATCHES,VOCAB per case (microbatch size 1)")
    parser.add_argument("--rounds", type=int, default=9, help="alternations per case")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and round (few: load drifts)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per side before the first round")
    parser.add_argument("--profile", action="store_true", help="then profile --steps steps per side")
    parser.add_argument("--timeout", type=int, default=900, help="seconds any one reply may take")
    parser.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)  # internal: one rank of one side
    parser.add_argument("--microbatches", type=int, default=8, help=argparse.SUPPRESS)  # internal, with --serve
    args = parser.parse_args(argv)
    if args.serve:
        return args
    if not args.peer_venv or not os.path.isfile(_python_of(args.peer_venv)):
        parser.error(f"--peer-venv must be a virtual environment with bin/python, got {args.peer_venv!r}")
    try:
        args.cases = [tuple(int(v) for v in case.split(",")) for case in args.cases]
    except ValueError:
        parser.error(f"--cases takes PP,MICROBATCHES,VOCAB triples, got {args.cases}")
    for pp, m, vocab in args.cases:
        if len((pp, m, vocab)) != 3 or not 2 <= pp <= args.layers or m < pp or vocab < 2:
            parser.error(f"case {pp},{m},{vocab}: need 2 <= pp <= layers ({args.layers}), microbatches >= pp")
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    return args


def _python_of(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


# ---- one rank of one side (runs under that side's python) ------------------------------------------------------
def _hf_pp_pipeline(model, mesh, batch: int, loss_fn):
    from hf_pp import AutoPipeline

    ap = AutoPipeline(mesh, pp_schedule="1f1b", pp_microbatch_size=1, pp_batch_size=batch, device="cpu")
    ap.build(model, loss_fn=loss_fn)
    return ap, ap.info


def _peer_pipeline(model, mesh, batch: int, loss_fn):
    import torch
    from nemo_automodel.components.distributed.pipelining import AutoPipeline

    ap = AutoPipeline(world_mesh=mesh, pp_schedule="1f1b", pp_microbatch_size=1, pp_batch_size=batch,
                      device=torch.device("cpu"))
    ap.build(model, loss_fn=loss_fn)
    return ap, ap.info


def _layers_held(parts) -> int:
    return sum(1 for part in parts for name, _ in part.named_modules()
               if name.rsplit(".", 2)[-2:-1] == ["layers"] and name.rsplit(".", 1)[-1].isdigit())


def _profile_split(prof, steps: int) -> dict:
    from where_time_goes import CATEGORIES, category

    split = dict.fromkeys(CATEGORIES, 0.0)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        split[category(event.key)] += seconds
        ops.append((seconds, event.count / steps, event.key))
    ops.sort(reverse=True)
    return {"split_s": split, "top": ops[:12], "op_calls": sum(o[1] for o in ops)}


def _python_calls(step) -> int:
    """Python function calls of one step on this rank's main thread (a count the machine's load cannot change)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


def _with_python_share(row: dict) -> dict:
    """Put the busy time outside ops (Python: module code, the schedule's logic) into its category."""
    split = row["split_s"]
    split["Python and the rest"] += max(row["busy_s"] - sum(split.values()), 0.0)
    return row


def serve(args) -> None:
    """One rank: build this side's pipeline, then answer 'run N' / 'profile N' / 'quit' read by rank 0."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    size = ModelSize(args.layers, args.hidden, args.vocab, args.seq)
    batch = args.microbatches
    ids, labels = make_batch(batch, size)
    builder = _hf_pp_pipeline if args.serve == "hf_pp" else _peer_pipeline
    ap, info = builder(tiny_llama(size), mesh, batch, sum_ce_loss(batch * size.seq))
    params = [p for part in info.model_parts for p in part.parameters()]

    def step(losses=None):
        ap.step(ids, target=labels if info.has_last_stage else None, losses=losses)
        for p in params:
            p.grad = None

    losses = []
    step(losses)  # shape inference, and the loss both sides must agree on
    loss = torch.tensor(float(sum(losses)) if info.has_last_stage else 0.0, dtype=torch.float64)
    dist.all_reduce(loss)
    layers = [None] * world
    dist.all_gather_object(layers, _layers_held(info.model_parts))
    reply = {"loss": loss.item(), "layers": layers}
    while True:
        if rank == 0:
            print(_TAG + json.dumps(reply), flush=True)
            words = (sys.stdin.readline().split() or ["quit"])
            command = torch.tensor([("quit", "run", "profile").index(words[0]), int(words[1]) if len(words) > 1 else 0])
        else:
            command = torch.zeros(2, dtype=torch.long)
        dist.broadcast(command, 0)
        what, n = command.tolist()
        if what == 0:
            break
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if what == 2 else None
        walls, busy = [], []
        with profiler if profiler is not None else contextlib.nullcontext():
            for _ in range(n):
                dist.barrier()
                start, cpu = time.perf_counter(), time.thread_time()
                step()
                walls.append(time.perf_counter() - start)
                busy.append(time.thread_time() - cpu)
        walls_t = torch.tensor(walls, dtype=torch.float64)
        dist.all_reduce(walls_t, op=dist.ReduceOp.MAX)
        mine = {"busy_s": median(busy)}
        if profiler is not None:
            mine = _with_python_share({**mine, **_profile_split(profiler, n), "python_calls": _python_calls(step)})
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        reply = {"times": walls_t.tolist(), "ranks": per_rank}
    dist.destroy_process_group()


# ---- the driver (runs under hf_pp's python) ---------------------------------------------------------------------
class Side:
    """One side's ranks, started with ``python``, kept alive between commands."""

    def __init__(self, name: str, python: str, case: tuple[int, int, int], args, logdir: str):
        self.name = name
        pp, m, vocab = case
        port = free_port()
        cmd = [python, os.path.abspath(__file__), "--serve", name, "--layers", str(args.layers), "--hidden",
               str(args.hidden), "--vocab", str(vocab), "--seq", str(args.seq), "--timeout", str(args.timeout)]
        cmd += ["--microbatches", str(m)]
        self.logs = [os.path.join(logdir, f"{name}-{pp}-{m}-{vocab}-rank{r}.log") for r in range(pp)]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(pp),
                   LOCAL_WORLD_SIZE=str(pp), OMP_NUM_THREADS="1")
        if name == "peer":
            env.pop("PYTHONPATH", None)  # nothing of hf_pp's environment leaks into the peer
        self.procs = []
        for r in range(pp):
            with open(self.logs[r], "w") as log:
                self.procs.append(subprocess.Popen(
                    cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdin=subprocess.PIPE if r == 0 else None,
                    stdout=subprocess.PIPE if r == 0 else log, stderr=log, text=True))
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.timeout = args.timeout

    def _read(self) -> None:
        for line in self.procs[0].stdout:
            if line.startswith(_TAG):
                self.replies.put(json.loads(line[len(_TAG):]))
        self.replies.put(None)

    def reply(self) -> dict:
        try:
            answer = self.replies.get(timeout=self.timeout)
        except queue.Empty:
            answer = None
        if answer is None:
            self.close()
            tails = "\n".join(f"--- {path}\n" + open(path).read()[-3000:] for path in self.logs)
            raise RuntimeError(f"{self.name} side did not answer (see its rank logs):\n{tails}")
        return answer

    def command(self, line: str) -> dict:
        self.procs[0].stdin.write(line + "\n")
        self.procs[0].stdin.flush()
        return self.reply()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_case(case, args, logdir: str) -> dict:
    pythons = {"hf_pp": sys.executable, "peer": _python_of(args.peer_venv)}
    sides, first = {}, {}
    try:
        for name in SIDES:  # one after the other: building competes for the cores
            sides[name] = Side(name, pythons[name], case, args, logdir)
            first[name] = sides[name].reply()
            if args.warmup:
                sides[name].command(f"run {args.warmup}")
        rounds = []
        for index in range(args.rounds):
            # A, B then B, A: whichever side runs first in a round gains or loses nothing on the whole.
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            replies = {name: sides[name].command(f"run {args.steps}") for name in order}
            # CPU time of a step summed over ranks: the work done, less sensitive to the machine's load than wall time.
            rounds.append({**{name: median(r["times"]) for name, r in replies.items()},
                           **{f"{name} cpu": sum(row["busy_s"] for row in r["ranks"]) for name, r in replies.items()}})
        profiles = {name: sides[name].command(f"profile {args.steps}") for name in SIDES} if args.profile else {}
    finally:
        for side in sides.values():
            side.close()
    return {"case": case, "first": first, "rounds": rounds, "profiles": profiles}


def report(args, results: list[dict]) -> str:
    lines = [
        f"# hf_pp / peer: AutoPipeline defaults, 1F1B, microbatch 1, Llama L={args.layers} H={args.hidden}, "
        f"{args.seq} tokens per sample",
        f"{datetime.date.today()}, {platform.machine()} with {cores()} CPU cores, one thread per rank; "
        f"{args.rounds} alternations of {args.steps} steps; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| pp | m | vocab | layers per stage, hf_pp | layers per stage, peer | first loss, hf_pp / peer | "
        "step hf_pp (s) | step peer (s) | hf_pp / peer | per round | CPU per step, hf_pp / peer |",
        "|---" * 11 + "|",
    ]
    for r in results:
        pp, m, vocab = r["case"]
        ratios = [x["hf_pp"] / x["peer"] for x in r["rounds"]]
        lines.append(
            f"| {pp} | {m} | {vocab} | {' / '.join(map(str, r['first']['hf_pp']['layers']))} | "
            f"{' / '.join(map(str, r['first']['peer']['layers']))} | "
            f"{r['first']['hf_pp']['loss']:.6f} / {r['first']['peer']['loss']:.6f} | "
            f"{median([x['hf_pp'] for x in r['rounds']]):.3f} | {median([x['peer'] for x in r['rounds']]):.3f} | "
            f"**{median(ratios):.3f}** | {', '.join(f'{x:.2f}' for x in ratios)} | "
            f"{median([x['hf_pp cpu'] / x['peer cpu'] for x in r['rounds']]):.3f} |")
    for r in results:
        for name, prof in r["profiles"].items():
            lines += ["", f"## Profile: {name}, case {','.join(map(str, r['case']))} (seconds per step, per rank)"]
            for rank, row in enumerate(prof["ranks"]):
                split = ", ".join(f"{k} {v:.4f}" for k, v in row["split_s"].items())
                lines.append(f"- rank {rank}: busy {row['busy_s']:.4f} s, {row['op_calls']:.0f} op calls, "
                             f"{row['python_calls']} Python calls; {split}")
                lines.append("  top ops: " + "; ".join(f"{key} {s * 1e3:.1f} ms x{n:.0f}" for s, n, key in row["top"]))
    lines += ["", "A step is the max over ranks; each figure is the median of its round's steps; the ratio is per "
              "round, then the median of the rounds. CPU per step: the ranks' main-thread CPU time, summed (the "
              "work done, whatever the waiting), median of the rounds' ratios."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return
    with tempfile.TemporaryDirectory(prefix="peer_compare_") as logdir:
        results = [run_case(case, args, logdir) for case in args.cases]
    print(report(args, results), flush=True)


if __name__ == "__main__":
    main()
