"""Pieces shared by the benchmark scripts: the tiny Llama, its batch, rank
spawning, peak-memory readings and timing helpers.

Benchmarks print figures; nothing here asserts on a time.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = [
    "ModelSize", "tiny_llama", "make_batch", "sum_ce_loss", "spawn_ranks", "release_freed_memory", "reset_peak_rss", "peak_rss_mb",
    "timed_steps", "median", "cores", "check_layout_args", "add_model_args", "add_layout_args", "check_microbatches", "model_size",
    "build_pipeline", "unsplit_step", "free_port",
]


class ModelSize:
    """The benchmarked Llama: layers, hidden size, vocabulary, tokens per sample."""

    def __init__(self, layers: int = 8, hidden: int = 256, vocab: int = 1024, seq: int = 128):
        self.layers, self.hidden, self.vocab, self.seq = layers, hidden, vocab, seq

    def __repr__(self) -> str:
        return f"Llama L={self.layers} H={self.hidden} vocab={self.vocab}, {self.seq} tokens/sample"


def tiny_llama(size: ModelSize, seed: int = 0):
    """A fp32 Llama built from a config (no download); MLP 4 x hidden, 64-wide heads, sdpa attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, size.hidden // 64)
    config = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(size.seq, 128), tie_word_embeddings=False, use_cache=False,
    )
    return LlamaForCausalLM(config).float().train()


def add_model_args(parser, layers: int = 8, hidden: int = 256, vocab: int = 1024, seq: int = 128,
                   vocab_help: str = "vocabulary size") -> None:
    """The benchmarked Llama's size options: --layers --hidden --vocab --seq (read back with ``model_size``)."""
    parser.add_argument("--layers", type=int, default=layers, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size (a multiple of 64)")
    parser.add_argument("--vocab", type=int, default=vocab, help=vocab_help)
    parser.add_argument("--seq", type=int, default=seq, help="tokens per sample")


def add_layout_args(parser, batch: int = 8, microbatches: int = 8, pp: int = 2, schedule: str = "1F1B") -> None:
    """One pipeline layout: --batch --microbatches --pp --schedule (check it with ``check_microbatches``)."""
    parser.add_argument("--batch", type=int, default=batch, help="samples per step")
    parser.add_argument("--microbatches", type=int, default=microbatches, help="microbatches per step")
    parser.add_argument("--pp", type=int, default=pp, help="pipeline ranks")
    parser.add_argument("--schedule", default=schedule, help="pipeline schedule name")


def check_microbatches(parser, args) -> None:
    if args.microbatches < 1 or args.batch % args.microbatches:
        parser.error(f"--batch {args.batch} is not divisible into {args.microbatches} microbatches")


def model_size(args) -> ModelSize:
    return ModelSize(args.layers, args.hidden, args.vocab, args.seq)


def build_pipeline(size: ModelSize, mesh, schedule_name: str, batch: int, microbatches: int):
    """This rank's part of the benchmark Llama under ``schedule_name``; returns ``(step, stages)``.

    ``step()`` runs forward + backward of one batch through the schedule (loss: ``sum_ce_loss``) and clears the
    gradients. Every rank builds the whole model first, as a user script does.
    """
    import gc

    from hf_pp.functional import pipeline_model

    model = tiny_llama(size)
    ids, labels = make_batch(batch, size)
    schedule, parts, has_first, has_last, stages = pipeline_model(
        model, mesh, None, pp_axis_name="pp", dp_axis_names=None, layers_per_stage=None,
        pipeline_parallel_schedule=schedule_name, pipeline_parallel_schedule_csv=None,
        microbatch_size=batch // microbatches, local_batch_size=batch, device="cpu",
        loss_fn=sum_ce_loss(batch * size.seq),
    )
    del model
    gc.collect()
    params = [p for part in parts for p in part.parameters()]
    inputs = (ids,) if has_first else ()
    target = labels if has_last else None

    def step():
        # return_outputs=False: a training loop needs no concatenated copy of every microbatch's logits.
        schedule.step(*inputs, target=target, return_outputs=False)
        for p in params:
            p.grad = None

    return step, stages


def make_batch(batch: int, size: ModelSize, seed: int = 1):
    """``(input_ids, labels)``: random tokens, labels already shifted (no -100), so every token counts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size.vocab, (batch, size.seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def sum_ce_loss(tokens: int) -> Callable:
    """Loss of one microbatch: summed cross entropy over the tokens of the whole batch (no grad scaling needed)."""
    import torch.nn.functional as F

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / tokens

    return loss_fn


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def unsplit_step(size: ModelSize, batch: int) -> Callable[..., None]:
    """``step(m=1)``: forward + backward of the whole batch on the unsplit model (the pipeline's weights), in m
    chunks with gradient accumulation; gradients cleared after."""
    model = tiny_llama(size)
    ids, labels = make_batch(batch, size)
    loss_fn = sum_ce_loss(batch * size.seq)

    def step(microbatches: int = 1) -> None:
        for chunk_ids, chunk_labels in zip(ids.chunk(microbatches), labels.chunk(microbatches)):
            loss_fn(model(input_ids=chunk_ids).logits, chunk_labels).backward()
        model.zero_grad(set_to_none=True)

    return step


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS shows live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed pages stay counted, peaks read a little high


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux ``clear_refs`` 5), so one process can measure several runs.

    Freed memory is released first: otherwise pages a previous run freed but the allocator kept count as peak.
    """
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux or not permitted: the peak then covers the whole process life


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step: Callable[[], None], warmup: int, steps: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Run ``step`` warmup + steps times; return the timed (post-warm-up) durations.

    ``sync`` runs before each timed step (a barrier on ranks), so every rank starts together.
    """
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, args, results):
    # torchrun's environment, so code under test sees what a torchrun launch gives it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - the parent must hear every failure
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 1800) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` fresh gloo processes, one intra-op thread each (as torchrun would)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, bytes]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=1.0)
            except Exception:  # queue.Empty
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
    if len(outcomes) < world:
        raise RuntimeError(f"ranks {sorted(set(range(world)) - set(outcomes))} did not finish")
    return [pickle.loads(outcomes[r][1]) for r in range(world)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def check_layout_args(parser, args, positive: Sequence[str], pp_sizes: Sequence[int]) -> None:
    """Exit through ``parser.error`` (a message, no traceback) on sizes no model or pipeline layout can have."""
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    hidden = getattr(args, "hidden", None)
    if hidden is not None and hidden % 64 and hidden > 64:
        parser.error(f"--hidden must be a multiple of 64 (64-wide attention heads), got {hidden}")
    for p in pp_sizes:
        if p < 2 or p > args.layers:
            parser.error(f"--pp {p}: need 2 <= pp <= layers ({args.layers}); a stage holds at least one layer")
