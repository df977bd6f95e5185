"""Run a function on N CPU ranks (gloo) with a hard timeout.

``run_distributed(fn, world_size, *args)`` spawns N fresh processes, sets up a
gloo process group in each (with its own timeout), calls ``fn(rank,
world_size, *args)`` and returns the list of per-rank return values. If a
rank raises, its traceback becomes the pytest failure; if any rank is still
running at the deadline, every rank is killed and the test fails naming the
ranks that hung. No test can hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["run_distributed", "free_port"]

DEFAULT_TIMEOUT_S = float(os.environ.get("HF_PP_TEST_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, pg_timeout_s, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, *args)
        # Plain pickle bytes: torch's queue pickler would pass tensors through shared
        # memory that vanishes when this process exits.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        # Report before tearing down, so the failing rank is heard before the peers it strands.
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` and its results must be picklable (module-level function, plain data / tensors).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # The process group times out a little before the harness, so a stuck
    # collective usually reports itself with a traceback first.
    pg_timeout = max(10.0, timeout_s - 15)
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, pg_timeout, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
                outcomes[rank] = (status, value)
                if status == "error":
                    # Give the others a moment to report, then stop waiting: they are likely blocked on the failed rank.
                    deadline = min(deadline, time.monotonic() + 5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    # outcomes is in arrival order: the first rank to fail is usually the cause,
    # the others fail on the collectives it abandoned.
    errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
    if errors:
        first = next(iter(errors))
        others = "".join(
            f"\n  then rank {r}: {v.strip().splitlines()[-1]}" for r, v in errors.items() if r != first
        )
        raise AssertionError(f"rank {first} of {world_size} raised:\n{errors[first]}{others}")
    missing = sorted(set(range(world_size)) - set(outcomes))
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(
            f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s (exit codes {codes}); killed."
        )
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
