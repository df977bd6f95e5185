"""Measured cost of each piece of a model's pipeline plan, for ``pp_balance="time"``.

The pieces are the embeddings, each decoder layer, and the final norm + LM
head + cross-entropy loss. Each piece is copied out of the model and given
memory on its own, one at a time (so a model built on the meta device works,
with random weights), and runs forward + backward through the same patched
forward the pipeline stages use, on random microbatches; the median time after
warm-up is its cost. Layers of the same structure (class, attention type,
parameter shapes) are timed once and share the figure, which also keeps noise
from splitting identical layers unevenly.

Under ``torch.distributed`` every rank profiles and the times are averaged over
the default process group, so every rank cuts the model the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .architectures import is_sequence_classifier, is_token_classifier, plan_pieces
from .balance import PieceCosts
from .functional import build_stage_modules

__all__ = ["time_costs"]


def time_costs(
    model: nn.Module,
    *,
    microbatch_size: int,
    seq_len: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    warmup: int = 1,
    steps: int = 3,
) -> PieceCosts:
    """Seconds of forward + backward per microbatch of ``microbatch_size`` x ``seq_len`` tokens, per piece.

    A collective over the default process group when one is initialised (call
    it on every rank); the random state of the caller is left as it was.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2, use_cache=False)
        >>> costs = time_costs(LlamaForCausalLM(cfg), microbatch_size=1, seq_len=8)
        >>> len(costs.layers), costs.unit, costs.last > 0
        (2, 'seconds', True)
    """
    device = torch.device(device)
    pieces = plan_pieces(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(0)
        vocab = _vocab_size(model)
        ids = torch.randint(0, vocab, (microbatch_size, seq_len), device=device)
        first, hidden = _time_first(model, [*pieces.first, *pieces.every], ids, device, dtype, warmup, steps)
        by_structure: dict[Hashable, float] = {}
        layers = []
        for index, fqn in enumerate(pieces.layers):
            key = _structure(model, fqn, index)
            if key not in by_structure:
                by_structure[key] = _time_hidden_piece(model, [fqn, *pieces.every], hidden, device, dtype, warmup, steps)
            layers.append(by_structure[key])
        labels = torch.randint(0, vocab, (microbatch_size, seq_len), device=device)
        last = _time_head(model, [*pieces.last, *pieces.every], hidden, labels, device, dtype, warmup, steps)
    costs = [first, *layers, last]
    if dist.is_available() and dist.is_initialized():
        costs = _mean_over_ranks(costs, device)
    return PieceCosts(costs[0], tuple(costs[1:-1]), costs[-1], "seconds")


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size


def _structure(model: nn.Module, fqn: str, index: int) -> Hashable:
    """What decides a layer's time: its class, attention type and parameter shapes."""
    layer = model.get_submodule(fqn)
    layer_types = getattr(model.config, "layer_types", None)
    kind = layer_types[index] if layer_types and index < len(layer_types) else None
    shapes = tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters())
    return type(layer).__qualname__, kind, shapes


def _piece(model: nn.Module, fqns: list[str], device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """One piece with memory of its own on ``device``, patched like a pipeline stage, in training mode."""
    part = build_stage_modules(model, [fqns], [0], device)[0]
    if dtype is not None:
        part.to(dtype)
    return part.train()


def _time_first(model, fqns, ids, device, dtype, warmup, steps) -> tuple[float, torch.Tensor]:
    """Cost of the embedding piece, and one of its outputs as the hidden states for the other pieces."""
    part = _piece(model, fqns, device, dtype)
    hidden = part(ids).detach()
    grad = torch.randn_like(hidden)

    def run() -> None:
        out = part(ids)
        if out.requires_grad:  # frozen embeddings (e.g. under LoRA) have no backward
            out.backward(grad)

    return _median_seconds(run, device, warmup, steps), hidden


def _time_hidden_piece(model, fqns, hidden, device, dtype, warmup, steps) -> float:
    part = _piece(model, fqns, device, dtype)
    x = hidden.clone().requires_grad_(True)
    grad = torch.randn_like(hidden)

    def run() -> None:
        part(x).backward(grad)

    return _median_seconds(run, device, warmup, steps)


def _time_head(model, fqns, hidden, labels, device, dtype, warmup, steps) -> float:
    part = _piece(model, fqns, device, dtype)
    x = hidden.clone().requires_grad_(True)
    kwargs: dict = {}
    if is_sequence_classifier(model):  # logits of each row's last token, and one label per row
        kwargs["last_token_index"] = torch.full(hidden.shape[:1], hidden.shape[1] - 1, device=device)
        labels = labels[:, 0] % model.config.num_labels
    elif is_token_classifier(model):
        labels = labels % model.config.num_labels

    def run() -> None:
        logits = part(x, **kwargs)
        F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten()).backward()

    return _median_seconds(run, device, warmup, steps)


def _median_seconds(run: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, steps)):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _mean_over_ranks(costs: list[float], device: torch.device) -> list[float]:
    """Every rank measured on its own device: average, so that all ranks partition alike."""
    vector = torch.tensor(costs, dtype=torch.float64, device=device)
    dist.all_reduce(vector)
    return (vector / dist.get_world_size()).tolist()
