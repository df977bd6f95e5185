"""Estimated cost of each piece of a model's pipeline plan, from its config and module shapes, for
``pp_balance="auto"`` (the default).

No profiling, no collective, no memory: a pure function of the model (meta-device is fine), the training
sequence length and the microbatch size, so every rank computes the same figures and cuts alike. A piece costs
its forward + backward work on one microbatch of ``T = microbatch_size x seq_len`` tokens, in FLOPs:

* matmuls, from the module shapes: each weight of two or more dimensions is applied once per token
  (``2 T numel`` FLOPs forward; backward twice that, once when the weight is frozen); an expert's weights see
  only the ``num_experts_per_tok / num_experts`` share of the tokens;
* attention scores, from the config: ``QK^T`` and ``AV`` over ``seq_len`` keys with
  ``num_attention_heads x (qk_head_dim + v_head_dim)`` per token and key (MLA's own dims where the config has
  them), in the layers with softmax attention;
* memory-bound work, in elements moved, each charged :data:`ELEMENT_FLOPS`: the embedding gather and its
  dense vocabulary x hidden gradient, the cross-entropy over ``T x vocab`` logits, matmul outputs, norms and
  biases, the attention softmax, and adding each trainable parameter's gradient every microbatch.

The embeddings thus cost almost no FLOPs but their gradient's memory; with a large vocabulary the head + loss
costs as much as many layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.nn as nn

from .architectures import plan_pieces, stage_layout
from .errors import PipelineConfigError

__all__ = ["ELEMENT_FLOPS", "CostModelError", "Work", "PlanWork", "plan_work", "flop_costs", "piece_work",
           "attention_dims", "expert_share", "MICROBATCH_OVERHEAD_TOKENS", "microbatch_step_estimate",
           "choose_microbatch_size"]

# One element read or written by memory-bound work costs about as long as this many matmul FLOPs. A machine's
# FLOPs per byte of bandwidth: ~10-40 per fp32 element for a CPU core, more on accelerators. Fitted to
# pp_balance="time" on a CPU; it matters only where the embeddings and the loss weigh against the layers.
ELEMENT_FLOPS = 16.0
# Passes over the T x vocab logits: the float cast, log-softmax (max, exp-sum, write), its backward and the
# gradient flowing back through the cast.
CROSS_ENTROPY_PASSES = 6
# Passes over a parameter when its gradient is added to ``.grad`` (read both, write one).
ACCUMULATE_PASSES = 3
# Passes of a norm (or bias) over its T x width activations, forward and backward.
VECTOR_PASSES = 4
# Passes over the attention probabilities (T x seq_len per head): mask, softmax, its backward.
SOFTMAX_PASSES = 4
# Layer types (config.layer_types) without a softmax over the keys: no attention-score work.
_NO_SOFTMAX_ATTENTION = ("linear", "mamba", "conv", "recurrent", "ssm")
_TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "moe_top_k",
                "num_selected_experts")
_NUM_EXPERTS_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class CostModelError(PipelineConfigError):
    """The cost model cannot cost this model; the message names what is missing."""


@dataclass(frozen=True)
class Work:
    """Forward + backward work of a piece: matmul ``flops`` and memory-bound ``elements`` moved."""

    flops: float = 0.0
    elements: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.elements + other.elements)

    def cost(self) -> float:
        """FLOPs, memory-bound elements charged :data:`ELEMENT_FLOPS` each.

        Example:
            >>> Work(100.0, 2.0).cost() == 100.0 + 2 * ELEMENT_FLOPS
            True
        """
        return self.flops + ELEMENT_FLOPS * self.elements


@dataclass(frozen=True)
class PlanWork:
    """:class:`Work` of each piece of a plan: ``first`` (embeddings), each of ``layers``, ``last`` (head + loss)."""

    first: Work
    layers: tuple[Work, ...]
    last: Work

    def costs(self) -> Any:
        """The pieces' :meth:`Work.cost`, as :class:`~hf_pp.balance.PieceCosts` in "flops"."""
        from .balance import PieceCosts

        return PieceCosts(self.first.cost(), tuple(w.cost() for w in self.layers), self.last.cost(), "flops")


def plan_work(model: nn.Module, *, microbatch_size: int, seq_len: int) -> PlanWork:
    """Forward + backward :class:`Work` of each piece of ``model``'s plan on one microbatch (see the module docstring).

    Raises :class:`CostModelError` naming what is missing when a piece cannot be costed.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2)
        >>> with torch.device("meta"):
        ...     work = plan_work(LlamaForCausalLM(cfg), microbatch_size=1, seq_len=8)
        >>> work.first.flops, work.last.flops == 6 * 8 * 16 * 64  # a gather; the head's matmul
        (0.0, True)
    """
    if microbatch_size < 1 or seq_len < 1:
        raise PipelineConfigError(f"microbatch_size and seq_len must be at least 1, got {microbatch_size} and {seq_len}.")
    config = _text_config(model)
    pieces = plan_pieces(model)
    tokens = microbatch_size * seq_len
    heads = set(stage_layout(model).head)  # lm_head / score: the loss reads their logits
    return PlanWork(
        first=piece_work(model, pieces.first, tokens, expert_share(config)),
        layers=tuple(_layer_work(model, fqn, _layer_config(config, i), _layer_type(config, i), tokens, seq_len)
                     for i, fqn in enumerate(pieces.layers)),
        last=piece_work(model, pieces.last, tokens, expert_share(config), loss_modules=heads),
    )


def flop_costs(model: nn.Module, *, microbatch_size: int, seq_len: int) -> Any:
    """Estimated forward + backward cost (FLOPs) of each piece on one microbatch, as :class:`~hf_pp.balance.PieceCosts`.

    Raises :class:`CostModelError` naming what is missing when a piece cannot be costed.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        ...                   num_attention_heads=4)
        >>> with torch.device("meta"):
        ...     costs = flop_costs(LlamaForCausalLM(cfg), microbatch_size=1, seq_len=128)
        >>> costs.unit, costs.layers[0] == costs.layers[1], costs.last > 4 * costs.layers[0] > 4 * costs.first
        ('flops', True, True)
    """
    return plan_work(model, microbatch_size=microbatch_size, seq_len=seq_len).costs()


def _layer_work(model: nn.Module, fqn: str, config: Any, kind: str, tokens: int, seq_len: int) -> Work:
    """One decoder layer: its modules, plus the attention scores where it attends with a softmax."""
    work = piece_work(model, [fqn], tokens, expert_share(config))
    if not any(word in kind for word in _NO_SOFTMAX_ATTENTION):
        work = work + _attention_scores(config, tokens, seq_len)
    return work


def piece_work(model: nn.Module, fqns: Sequence[str], tokens: int, share: Callable[[nn.Module], float],
               loss_modules: set[str] = frozenset()) -> Work:
    """Work of the modules ``fqns`` on ``tokens`` tokens (attention scores aside); ``loss_modules`` end in the loss.

    ``share(experts_module)`` is the share of tokens an expert of that module sees (see :func:`expert_share`).

    Example:
        >>> w = piece_work(nn.Sequential(nn.Linear(4, 8, bias=False)), ["0"], 10, lambda m: 1.0)
        >>> w.flops == 3 * 2 * 10 * 32, w.elements == 2 * 10 * 8 + ACCUMULATE_PASSES * 32  # outputs; grad accumulation
        (True, True)
    """
    total = Work()
    for fqn in fqns:
        module = model.get_submodule(fqn)
        total = total + _module_work(module, fqn.rsplit(".", 1)[-1], tokens, 1.0, share)
        if fqn in loss_modules:
            total = total + Work(0.0, CROSS_ENTROPY_PASSES * tokens * _output_width(module))
    return total


def _module_work(module: nn.Module, name: str, tokens: int, routed: float, share: Callable[[nn.Module], float]) -> Work:
    """Work of ``module`` and its children; ``routed`` is the share of the tokens that reach it (experts: < 1)."""
    if _is_experts(name, module):
        routed *= share(module)
        share = _all_tokens  # experts inside experts (JetMoE's) see the tokens routed to the outer ones
    if isinstance(module, nn.Embedding):
        return _embedding_work(module, tokens)
    work = Work()
    for pname, p in module.named_parameters(recurse=False):
        work = work + _parameter_work(module, pname, p, tokens * routed)
    for child_name, child in module.named_children():
        work = work + _module_work(child, child_name, tokens, routed, share)
    return work


def _embedding_work(embedding: nn.Embedding, tokens: int) -> Work:
    """A gather: no FLOPs, but the backward fills a dense vocabulary x hidden gradient with zeros, scatters
    the rows into it and adds it to ``.grad`` (read, read, write): four passes over the whole table."""
    weight = embedding.weight
    rows = tokens * weight.shape[-1]
    backward = 4 * weight.numel() + 2 * rows if weight.requires_grad else 0
    return Work(0.0, rows + backward)


def _parameter_work(module: nn.Module, name: str, p: Any, tokens: float) -> Work:
    """One parameter on ``tokens`` tokens: a matmul weight (2+ dims) or a per-channel vector (norm, bias)."""
    # Every microbatch adds its gradient to .grad: read both, write one.
    accumulate = ACCUMULATE_PASSES * p.numel() if p.requires_grad else 0
    if p.dim() >= 2 and "bias" not in name:
        macs = tokens * p.numel()
        flops = 2 * macs + 2 * macs + (2 * macs if p.requires_grad else 0)  # forward; input grad; weight grad
        outputs = tokens * _rows(module, p)
        return Work(flops, 2 * outputs + accumulate)  # written forward, read back for the backward
    return Work(0.0, VECTOR_PASSES * tokens * p.numel() + accumulate)


def _rows(module: nn.Module, p: Any) -> int:
    """Output values per token of a weight: a Linear's out_features (``nf`` of transformers' Conv1D, GPT-2's
    transposed Linear), else all but the input (last) dimension."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(getattr(module, "nf", None), int):
        return module.nf
    return p.numel() // max(1, p.shape[-1])


def _output_width(module: nn.Module) -> int:
    """Logits per token of a head: the out_features of its last Linear."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _is_experts(name: str, module: nn.Module) -> bool:
    """Routed experts: ``mlp.experts`` or a ``*Experts`` class (``MixtralExperts``, ...), but not shared experts
    (``shared_experts = InklingSharedExperts(...)``), which every token goes through. The attribute name decides:
    a class name may carry the model's own "Shared" (``GraniteMoeSharedParallelExperts`` are routed)."""
    return (name == "experts" or type(module).__name__.endswith("Experts")) and "shared" not in name.lower()


def _all_tokens(module: nn.Module) -> float:
    return 1.0


def expert_share(config: Any) -> Callable[[nn.Module], float]:
    """``share(experts_module)``: ``num_experts_per_tok / num_experts`` of the config (the count of experts
    read off the module where the config has none); raises :class:`CostModelError` when an experts
    module meets a config without top-k.

    Example:
        >>> from types import SimpleNamespace
        >>> expert_share(SimpleNamespace(num_experts_per_tok=2, num_local_experts=8))(nn.Module())
        0.25
    """
    top_k = _first_attr(config, _TOP_K_NAMES)
    count = _first_attr(config, _NUM_EXPERTS_NAMES)

    def share(module: nn.Module) -> float:
        experts = count or _experts_in(module)
        if not top_k or not experts:
            missing = "num_experts_per_tok" if not top_k else "num_experts"
            raise CostModelError(
                f"pp_balance='auto' cannot cost the experts of {type(module).__name__}: the config has no {missing} "
                f"(looked for {', '.join(_TOP_K_NAMES if not top_k else _NUM_EXPERTS_NAMES)})"
            )
        return min(1.0, top_k / experts)

    return share


def _experts_in(module: nn.Module) -> int | None:
    """Number of experts of a module: a ModuleList's length or the leading dimension of fused expert weights."""
    if isinstance(module, nn.ModuleList):
        return len(module)
    fused = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return fused[0] if fused else None


def attention_dims(config: Any) -> tuple[int, int, int]:
    """``(heads, qk_head_dim, v_head_dim)`` of the config's attention (MLA's qk/v dims where it has them).

    Example:
        >>> from types import SimpleNamespace
        >>> attention_dims(SimpleNamespace(num_attention_heads=4, hidden_size=64, head_dim=None))
        (4, 16, 16)
    """
    heads, hidden = _attr(config, "num_attention_heads"), _attr(config, "hidden_size")
    head_dim = _attr(config, "head_dim") or (hidden // heads if heads and hidden else None)
    if not heads or not head_dim:
        missing = "num_attention_heads" if not heads else "head_dim (or hidden_size)"
        raise CostModelError(f"pp_balance='auto' cannot cost the attention of {type(config).__name__}: "
                             f"its config has no {missing}")
    qk = _attr(config, "qk_head_dim") or ((_attr(config, "qk_nope_head_dim") or 0)
                                          + (_attr(config, "qk_rope_head_dim") or 0)) or head_dim
    v = _attr(config, "v_head_dim") or head_dim
    return heads, qk, v


def _attention_scores(config: Any, tokens: int, seq_len: int) -> Work:
    """``QK^T`` and ``AV`` of one layer over ``seq_len`` keys (a dense score matrix, as eager and sdpa with a
    mask compute it), forward and backward (twice the forward), plus the softmax over the scores."""
    heads, qk, v = attention_dims(config)
    forward = 2 * tokens * seq_len * heads * (qk + v)
    return Work(3 * forward, SOFTMAX_PASSES * tokens * seq_len * heads)


def _layer_type(config: Any, index: int) -> str:
    kinds = _attr(config, "layer_types") or []
    return str(kinds[index]) if index < len(kinds) else ""


def _layer_config(config: Any, index: int) -> Any:
    """The config of layer ``index``: its own where the config is heterogeneous (``per_layer_config``)."""
    per_layer = _attr(config, "per_layer_config")
    return per_layer[index] if per_layer is not None and index < len(per_layer) else config


def _attr(config: Any, name: str) -> Any:
    """``config.name`` or None; a heterogeneous config raises (a RuntimeError) for attributes set per layer."""
    try:
        return getattr(config, name, None)
    except RuntimeError:
        return None


def _first_attr(config: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = _attr(config, name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise CostModelError(f"pp_balance='auto' costs Hugging Face models; {type(model).__name__} has no config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# The fixed cost of one microbatch through a rank's stages (weights read again, per-op overhead), in tokens of
# work: benchmarks/microbatch_cost.py measured one 8-sample batch of 128 tokens as 8 microbatches at 1.132x,
# 4 at 1.062x, 2 at 1.018x of one batch (2026-12-01, one CPU thread, Llama H=256); step(b) = b*s + 20 fits all three
# within 0.5%. Accelerators pay far more per microbatch (kernel launches): there this is a floor, not an estimate.
MICROBATCH_OVERHEAD_TOKENS = 20
# A larger microbatch holds more activations in flight: choose one only when it is estimated this much faster.
_MICROBATCH_GAIN_NEEDED = 0.02


def microbatch_step_estimate(batch_size: int, microbatch_size: int, pp_size: int, seq_len: int, *,
                             stages_per_rank: int = 1, overhead_tokens: float = MICROBATCH_OVERHEAD_TOKENS) -> float:
    """A step's estimated length, in tokens of one rank's work: ``(m + (p - 1) / v) x (b x s + overhead)``.

    Each of the ``m = batch / b`` microbatches costs its tokens plus a fixed overhead, and the schedule's
    fill and drain add ``(p - 1) / v`` microbatches' worth of waiting (v stages per rank).

    Example:
        >>> microbatch_step_estimate(8, 1, 2, 128), microbatch_step_estimate(8, 2, 2, 128)
        (1332.0, 1380.0)
    """
    m = batch_size // microbatch_size
    return (m + (pp_size - 1) / stages_per_rank) * (microbatch_size * seq_len + overhead_tokens)


def choose_microbatch_size(batch_size: int, pp_size: int, seq_len: int, *, schedule: str | None = "1f1b",
                           schedule_csv: str | None = None, stages_per_rank: int | None = None,
                           overhead_tokens: float = MICROBATCH_OVERHEAD_TOKENS) -> int:
    """The ``pp_microbatch_size`` with the shortest :func:`microbatch_step_estimate` that the schedule accepts.

    Candidates divide ``batch_size``; the smallest wins unless a larger one is estimated at least 2% faster
    (it holds more activations in flight). ``stages_per_rank`` defaults to the schedule's default (1, or 2 for
    multi-stage schedules). Pure: every rank chooses alike.

    Example:
        >>> choose_microbatch_size(8, 2, 512)            # the bubble outweighs the per-microbatch overhead
        1
        >>> choose_microbatch_size(64, 2, 128)           # many short samples: fewer, larger microbatches
        2
        >>> choose_microbatch_size(64, 2, 2048)          # long samples dwarf the overhead
        1
    """
    from .schedules import resolve_schedule, validate_microbatches

    if batch_size < 1 or pp_size < 1 or seq_len < 1:
        raise PipelineConfigError(
            f"choose_microbatch_size needs a positive batch, pp size and sequence length, got {batch_size}, "
            f"{pp_size}, {seq_len}.")
    spec = resolve_schedule(schedule, schedule_csv)
    v = stages_per_rank or (1 if spec.single_stage else 2)
    best, best_time = 1, None
    for b in (b for b in range(1, batch_size + 1) if batch_size % b == 0):
        try:
            validate_microbatches(spec, batch_size, b, pp_size, v)
        except PipelineConfigError:
            continue  # too few microbatches for this schedule
        estimate = microbatch_step_estimate(batch_size, b, pp_size, seq_len, stages_per_rank=v,
                                            overhead_tokens=overhead_tokens)
        if best_time is None or estimate < best_time * (1 - _MICROBATCH_GAIN_NEEDED):
            best, best_time = b, estimate
    return best
