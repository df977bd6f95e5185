"""Ranks agree, fail together, and say who failed.

- :func:`agree_before_start`: run the pure pre-flight checks on every rank, then
  one cheap ``all_gather_object`` of a configuration fingerprint and the check's
  outcome. Ranks that disagree get an error naming the differing fields; an
  error on any rank is raised on all of them.
- :func:`report_rank_failures`: around training; the first rank to fail writes
  ``rank, step, error`` into the process group's store, and every other rank,
  when its next collective breaks, raises :class:`RankFailedError` naming it.
- :func:`check_loss_finite`: non-finite losses reported with step and stage.
- :func:`release_at_exit`: a finished job exits cleanly (process groups freed
  before the interpreter shuts down).

Example::

    agree_before_start(lambda: validate_pipeline_setup(model, args, kwargs), config_fingerprint(args, model))
    with report_rank_failures(lambda: trainer.state.global_step + 1):
        trainer.train()
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .errors import PipelineConfigError

__all__ = ["RankFailedError", "NonFiniteLossError", "config_fingerprint", "agree_before_start",
           "report_rank_failures", "watch_for_peer_failure", "check_loss_finite", "release_at_exit"]

logger = logging.getLogger(__name__)

# Fields that are per-rank by design (or hold a timestamp / host name).
_PER_RANK_ARGS = {"local_rank", "logging_dir", "_n_gpu", "process_index", "local_process_index"}


class RankFailedError(RuntimeError):
    """This rank stopped because another rank failed first (the message names it)."""


class NonFiniteLossError(FloatingPointError):
    """A nan/inf loss with ``pp_raise_on_nan_inf=True``; raised on every rank together."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else "sha1:" + hashlib.sha1(text.encode()).hexdigest()[:12]


def config_fingerprint(args, model=None, **extra: Any) -> dict[str, str]:
    """``{field: short value or hash}`` of what every rank must agree on.

    Covers every training argument (except per-rank ones), the model class,
    config and a per-parameter checksum of its initial weights (different seeds
    would silently give replicas different models), plus ``extra``.

    Example:
        >>> from hf_pp import PipelineTrainingArguments
        >>> fp = config_fingerprint(PipelineTrainingArguments("out", pp_size=2, report_to="none"), world_size=2)
        >>> fp["args.pp_size"], fp["world_size"]
        ('2', '2')
    """
    fields = {f"args.{k}": _short(v) for k, v in sorted(args.to_dict().items()) if k not in _PER_RANK_ARGS}
    if model is not None:
        fields["model.class"] = type(model).__name__
        config = getattr(model, "config", None)
        if config is not None:
            fields.update({f"model.config.{k}": _short(v) for k, v in sorted(config.to_dict().items())
                           if k not in ("transformers_version",)})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.device.type != "meta":
                    fields[f"model.weights.{name}"] = f"{float(p.detach().double().sum()):.6e}"
    fields.update({k: _short(v) for k, v in extra.items()})
    return fields


def _differences(fingerprints: list[dict[str, str]], limit: int = 3) -> str:
    keys = sorted(set().union(*fingerprints))
    lines = []
    for key in keys:
        values = [fp.get(key, "<missing>") for fp in fingerprints]
        if len(set(values)) > 1:
            lines.append(f"{key}: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(values)))
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def agree_before_start(check: Callable[[], None], fingerprint: dict[str, str], group=None) -> None:
    """Run ``check`` (pure, may raise PipelineConfigError), then make every rank reach the same verdict.

    Without an initialised process group it only runs ``check``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check()
        return
    error = None
    try:
        check()
    except PipelineConfigError as exc:
        error = str(exc)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (fingerprint, error), group=group)
    fingerprints = [fp for fp, _ in gathered]
    if any(fp != fingerprints[0] for fp in fingerprints):
        raise PipelineConfigError(
            "Ranks disagree on the configuration: " + _differences(fingerprints) + ". Launch every rank with the "
            "same arguments, model and seed (transformers.set_seed before building the model)."
        )
    failed = {rank: e for rank, (_, e) in enumerate(gathered) if e}
    if failed:
        rank, message = next(iter(failed.items()))
        if len(failed) == len(gathered):
            raise PipelineConfigError(message)
        raise PipelineConfigError(f"{message} (on ranks {sorted(failed)})")


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store, no reports: the original error still propagates
        return None


def _dead_ranks(store, world: int) -> list[int]:
    """Ranks of this host whose process is gone (SIGKILL, out of memory)."""
    host, dead = socket.gethostname(), []
    for rank in range(world):
        try:
            if not store.check([f"hf_pp/pid/{rank}"]):
                continue
            where, pid = store.get(f"hf_pp/pid/{rank}").decode().rsplit(":", 1)
            if where == host:
                os.kill(int(pid), 0)
                if _is_zombie(int(pid)):  # dead, not yet reaped by its launcher
                    dead.append(rank)
        except ProcessLookupError:
            dead.append(rank)
        except Exception:  # noqa: BLE001
            continue
    return dead


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False  # not Linux, or gone: the caller's os.kill decides


def watch_for_peer_failure(store, rank: int, on_failure: Callable[[dict], None],
                           poll_s: float = 1.0) -> Callable[[], None]:
    """Call ``on_failure(record)`` from a background thread once another rank records its failure in ``store``.

    gloo breaks a collective when a peer's process exits, so the peers learn of it at once. NCCL does not: a
    collective with a failed peer blocks until the watchdog's timeout (``ddp_timeout``, 30 minutes by
    default). Under NCCL :func:`report_rank_failures` passes an ``on_failure`` that aborts the process
    groups, so the blocked collective fails now and the failure is named. Returns ``stop()``.

    Example:
        >>> from torch.distributed import HashStore
        >>> import json, threading
        >>> store, seen = HashStore(), threading.Event()
        >>> stop = watch_for_peer_failure(store, 0, lambda record: seen.set(), poll_s=0.01)
        >>> store.set("hf_pp/failed", json.dumps({"rank": 1, "step": 3, "error": "boom"}))
        >>> seen.wait(5), stop()
        (True, None)
    """
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(poll_s):
            try:
                if not store.check(["hf_pp/failed"]):
                    continue
                record = json.loads(store.get("hf_pp/failed"))
            except Exception:  # noqa: BLE001 - the store went with its host: the collectives break anyway
                return
            if record.get("rank") != rank:
                on_failure(record)
            return

    threading.Thread(target=watch, name="hf_pp-peer-failure-watch", daemon=True).start()
    return stopped.set


def _abort_nccl_groups(record: dict) -> None:
    """Make this rank's blocked NCCL collectives fail now (torch's NCCL-only abort; see watch_for_peer_failure)."""
    logger.error("rank %s failed in step %s: %s; aborting this rank's NCCL process groups", record.get("rank"),
                 record.get("step"), record.get("error"))
    with contextlib.suppress(Exception):
        dist.distributed_c10d._abort_process_group()


@contextlib.contextmanager
def report_rank_failures(step: Callable[[], int], wait_s: float = 2.0) -> Iterator[None]:
    """Name the rank that failed first, on every rank.

    The failing rank records ``(rank, step, error)`` in the default store before
    its process exits; a rank whose collective then breaks (gloo: at once; NCCL: when
    :func:`watch_for_peer_failure` aborts its process groups; otherwise after ``ddp_timeout``)
    raises :class:`RankFailedError` with that record, or names the ranks whose process is gone.
    """
    store = _store() if dist.is_initialized() else None
    if store is None:
        yield
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    with contextlib.suppress(Exception):
        store.set(f"hf_pp/pid/{rank}", f"{socket.gethostname()}:{os.getpid()}")
    stop_watch = watch_for_peer_failure(store, rank, _abort_nccl_groups) if dist.get_backend() == "nccl" else None
    try:
        yield
    except (PipelineConfigError, NonFiniteLossError):
        raise  # raised by identical checks on every rank together: nobody to blame
    except Exception as exc:
        record = _first_failure(store, rank, exc, step(), wait_s, world)
        if record is None or record["rank"] == rank:
            print(f"hf_pp: rank {rank} failed in step {step()}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise
        raise RankFailedError(
            f"rank {record['rank']} failed in step {record['step']}: {record['error']} (rank {rank} stopped because "
            "its collectives with that rank broke)"
        ) from exc
    finally:
        if stop_watch is not None:
            stop_watch()


def _first_failure(store, rank: int, exc: Exception, step: int, wait_s: float, world: int) -> dict | None:
    """The failure record of the first rank to fail, after writing ours if none exists yet."""
    try:
        text = str(exc).lower()
        peer_error = isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "timed out"))
        deadline = time.monotonic() + (wait_s if peer_error else 0)
        while True:
            if store.check(["hf_pp/failed"]):
                return json.loads(store.get("hf_pp/failed"))
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        dead = _dead_ranks(store, world) if peer_error else []
        if dead:
            return {"rank": dead[0], "step": step, "error": f"its process is gone (killed, e.g. SIGKILL or out of "
                                                            f"memory); dead ranks {dead}"}
        record = {"rank": rank, "step": step, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if store.add("hf_pp/failures", 1) == 1:
            store.set("hf_pp/failed", json.dumps(record))
            return record
        return json.loads(store.get("hf_pp/failed"))
    except Exception:  # noqa: BLE001 - the store may be gone with its host rank
        return None


def check_loss_finite(loss: torch.Tensor, *, step: int, pp, raise_error: bool) -> None:
    """Report a nan/inf loss with the optimizer step and the stage that computed it.

    By default only warns (once per pipeline, from the rank holding the last
    stage) and leaves the loss to Trainer, whose ``logging_nan_inf_filter``
    keeps it out of the logged average as usual. With ``raise_error`` every
    rank raises :class:`NonFiniteLossError` together (one scalar all-reduce
    per step).
    """
    bad = not bool(torch.isfinite(loss).all())
    where = f"stage {pp.num_stages - 1} (the last, which computes the loss)"
    if raise_error:
        flag = torch.tensor(float(bad), device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, (pp.dp_rank, bad, _nonfinite_stages(pp)))
            replicas = sorted({dp for dp, b, _ in ranks if b})
            stages = sorted({s for _, _, found in ranks for s in found})
            raise NonFiniteLossError(
                f"Non-finite loss at optimizer step {step} on data-parallel replicas {replicas}, computed by {where}; "
                f"stages with non-finite parameters or gradients: {stages or 'none'}. Lower the learning rate, "
                "check the data, or set pp_raise_on_nan_inf=False to let Trainer skip it in the logs."
            )
    elif bad and pp.has_last:
        logger.warning("Non-finite loss (%s) at optimizer step %d on data-parallel replica %d, computed by %s; "
                       "stages of this rank with non-finite parameters or gradients: %s.", float(loss), step,
                       pp.dp_rank, where, _nonfinite_stages(pp) or "none")


def _nonfinite_stages(pp) -> list[int]:
    found = []
    for stage, part in zip(pp.stage_ids, pp.parts):
        for p in part.parameters():
            if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
                found.append(stage)
                break
    return found


_RELEASE_AT_EXIT: "weakref.WeakSet[Any]" = weakref.WeakSet()


def release_at_exit(owner: Any) -> None:
    """At interpreter exit, call ``owner._release_pipeline()``, destroy the process groups and collect garbage.

    Without this a finished job can still abort ("terminate called without an
    active exception", exit code -6): a gloo process group that outlives the
    interpreter's shutdown is freed during finalization, and its worker threads
    then need the GIL to free the tensors of the last collective they ran. Done
    while Python is still whole, the same teardown is safe. Registered once;
    ``owner`` is held weakly.
    """
    if not _RELEASE_AT_EXIT:
        atexit.register(_release_all)
    _RELEASE_AT_EXIT.add(owner)


def _release_all() -> None:
    for owner in list(_RELEASE_AT_EXIT):
        owner._release_pipeline()
    _RELEASE_AT_EXIT.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the last references to the process groups sit in reference cycles
