"""Run a function on N CPU ranks (gloo) with a hard timeout.

``run_distributed(fn, world_size, *args)`` spawns N fresh processes, sets up a
gloo process group in each (with its own timeout), calls ``fn(rank,
world_size, *args)`` and returns the list of per-rank return values. If a
rank raises, its traceback becomes the pytest failure; if any rank is still
running at the deadline, every rank is killed and the test fails naming the
ranks that hung. No test can hang.

Ranks fork from a server process that imported torch, transformers and peft
once per test session (multiprocessing's "forkserver", with those modules
preloaded), so a test pays almost no import time per rank: about 5 s of one
core per rank otherwise, most of a small multi-rank test. Every rank is still
a fresh process, forked from a server that has done nothing but import. Preloaded
libraries read some environment variables at import (huggingface_hub's
``HF_HOME``, ``HF_HUB_OFFLINE``), so a test whose environment differs from the
one the server started with gets freshly spawned ranks instead, as does every
test when ``HF_PP_TEST_START_METHOD=spawn``.
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
# Imported once by the fork server; a module that fails to import there is imported by each rank as before.
# Nothing here may start a thread: forking a process copies only the thread that forks, and a lock another
# thread held stays held in the child. pyarrow (imported by transformers.trainer through datasets) starts
# jemalloc's background thread, so hf_pp.trainer is left to each rank (about 0.5 s once these are loaded).
PRELOADED = ("torch", "torch.distributed", "torch.distributed.pipelining", "transformers", "peft",
             "transformers.models.llama.modeling_llama", "helpers.hf_models")
# Set by pytest for every test: not something a rank's libraries read.
_IGNORED_ENV = ("PYTEST_CURRENT_TEST",)
_fork_server: dict[str, Any] = {}  # the context and the environment the server started with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _IGNORED_ENV}


def _start_context() -> mp.context.BaseContext:
    """The fork server's context while this process's environment is the one it started with; else spawn."""
    if os.environ.get("HF_PP_TEST_START_METHOD", "forkserver") == "spawn":
        return mp.get_context("spawn")
    if not _fork_server:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOADED))
        _fork_server.update(context=ctx, environment=_environment())
    if _environment() != _fork_server["environment"]:
        return mp.get_context("spawn")
    return _fork_server["context"]


def _write_where(parent_pid: int) -> None:
    """Send this rank's stdout and stderr where the test's go now (pytest's capture), not to the fork server's."""
    for fd in (1, 2):
        try:
            # Opening /proc/PID/fd/N reopens the parent's file (a deleted capture file too); append, so a write never
            # lands over what the parent wrote.
            target = os.open(f"/proc/{parent_pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue  # a socket, or not Linux: keep the server's
        os.dup2(target, fd)
        os.close(target)


def _worker(fn, rank, world_size, port, pg_timeout_s, args, results, cwd, forked_from):
    if forked_from is not None:
        os.chdir(cwd)  # a forked rank starts in the server's directory, not the test's
        _write_where(forked_from)
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
    ctx = _start_context()
    forked_from = os.getpid() if ctx.get_start_method() == "forkserver" else None
    results = ctx.Queue()
    port = free_port()
    # The process group times out a little before the harness, so a stuck
    # collective usually reports itself with a traceback first.
    pg_timeout = max(10.0, timeout_s - 15)
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, pg_timeout, args, results, os.getcwd(), forked_from),
                    daemon=True)
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
