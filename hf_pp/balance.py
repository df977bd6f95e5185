"""Balanced pipeline stages: where to cut the layer stack so that the slowest stage is as fast as it can be.

``pp_balance`` picks what a stage costs:

* ``"auto"`` (default): forward + backward FLOPs estimated from the config and
  the module shapes (:mod:`hf_pp.cost_model`: matmuls, attention scores at the
  training sequence length, experts by their routed share, the embeddings'
  gradient and the loss over the vocabulary as memory-bound work); no profiling,
  no collective. Models hf_pp has no plan for, or an explicit
  ``module_fqns_per_model_part``, are cut as "layers";
* ``"layers"``: every stage gets the same number of decoder layers
  (:func:`hf_pp.stage_math.split_layers_evenly`, NeMo's split); nothing is measured;
* ``"params"``: parameters held. The embeddings count on the first stage, the
  final norm and LM head on the last (a tied head too: that stage holds a
  copy), so a large vocabulary moves layers away from the ends;
* ``"time"``: forward + backward time of each piece on random microbatches
  (:mod:`hf_pp.profiling`); the head piece includes the loss.

A stage costs the sum of its pieces; :func:`partition_layers` cuts the layers
into consecutive ranges that minimise the largest stage cost. The plan is
computed once (:func:`balance_stages`) and handed down as
``module_fqns_per_model_part``, so every later planning call sees the same
fixed plan and profiling runs only once.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .architectures import PlanPieces, module_fqns_per_stage, plan_pieces
from .errors import PipelineConfigError
from .functional import plan_stage_fqns
from .layout import stage_facts
from .schedules import ScheduleSpec
from .split import validate_stage_fqns
from .stage_math import split_layers_evenly

__all__ = [
    "BALANCE_MODES",
    "DEFAULT_BALANCE",
    "DEFAULT_PROFILE_SEQ_LEN",
    "PieceCosts",
    "BalancedPlan",
    "check_balance_mode",
    "check_balance_options",
    "partition_layers",
    "param_costs",
    "profile_seq_len",
    "estimate_seq_len",
    "can_balance",
    "first_batch_seq_len",
    "balance_stages",
    "balanced_module_fqns",
]

logger = logging.getLogger(__name__)

BALANCE_MODES = ("auto", "layers", "params", "time")
DEFAULT_BALANCE = "auto"
# Modes that take an explicit module_fqns_per_model_part as the plan ("auto", the default, must never refuse one).
_KEEPS_EXPLICIT_PLAN = ("auto", "layers")
# Profiling length when neither pp_balance_seq_len nor a training batch says otherwise (capped by the model's positions).
DEFAULT_PROFILE_SEQ_LEN = 512


@dataclass(frozen=True)
class PieceCosts:
    """Cost of each piece of a model's plan: ``first`` (embeddings), each of ``layers``, ``last``
    (final norm, head and, for time and flops, the loss), in ``unit`` ("parameters", "seconds" or "flops")."""

    first: float
    layers: tuple[float, ...]
    last: float
    unit: str

    def stage_costs(self, layer_ranges: Sequence[range]) -> list[float]:
        """Cost of each stage when stage ``s`` holds the layers ``layer_ranges[s]``.

        Example:
            >>> PieceCosts(5.0, (1.0, 1.0, 1.0), 4.0, "parameters").stage_costs([range(0, 1), range(1, 3)])
            [6.0, 6.0]
        """
        last = len(layer_ranges) - 1
        return [
            sum(self.layers[i] for i in r) + (self.first if s == 0 else 0.0) + (self.last if s == last else 0.0)
            for s, r in enumerate(layer_ranges)
        ]


@dataclass(frozen=True)
class BalancedPlan:
    """A stage plan: ``fqns_per_stage`` (pass it as ``module_fqns_per_model_part``), the decoder
    layers of each stage, and the costs it was balanced on (None for "layers")."""

    mode: str
    fqns_per_stage: list[list[str]]
    layer_ranges: list[range]
    costs: PieceCosts | None

    def stage_costs(self) -> list[float] | None:
        """Cost of each stage of this plan (None for "layers", which measures nothing)."""
        return None if self.costs is None else self.costs.stage_costs(self.layer_ranges)

    def even_stage_costs(self) -> list[float] | None:
        """Cost of each stage had the layers been spread evenly ("layers"), for comparison."""
        if self.costs is None:
            return None
        return self.costs.stage_costs(split_layers_evenly(len(self.costs.layers), len(self.layer_ranges)))


def check_balance_mode(mode: str) -> str:
    """Return ``mode`` when it is one of :data:`BALANCE_MODES`, else raise saying which to use.

    Example:
        >>> check_balance_mode("params")
        'params'
        >>> check_balance_mode("flops")
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: pp_balance must be one of ('auto', 'layers', 'params', 'time'), got 'flops'.
    """
    if mode not in BALANCE_MODES:
        raise PipelineConfigError(f"pp_balance must be one of {BALANCE_MODES}, got {mode!r}.")
    return mode


def check_balance_options(mode: str, module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
                          seq_len: int | None = None) -> None:
    """Refuse balancing options that cannot work together (pure; the same answer on every rank).

    "auto" (the default) and "layers" keep an explicit ``module_fqns_per_model_part`` as given.

    Example:
        >>> check_balance_options("auto", [["embed", "layers.0"], ["layers.1", "head"]])
        >>> check_balance_options("params", [["embed", "layers.0"], ["layers.1", "head"]])
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: pp_balance='params' computes the stage plan itself, but module_fqns_per_model_part gives one; drop one of them (pp_balance='auto' or 'layers' keeps your plan as given).
    """
    check_balance_mode(mode)
    if mode not in _KEEPS_EXPLICIT_PLAN and module_fqns_per_model_part is not None:
        raise PipelineConfigError(
            f"pp_balance={mode!r} computes the stage plan itself, but module_fqns_per_model_part gives one; drop one "
            "of them (pp_balance='auto' or 'layers' keeps your plan as given)."
        )
    if seq_len is not None and seq_len < 1:
        raise PipelineConfigError(f"pp_balance_seq_len must be at least 1 (or unset), got {seq_len}.")


def partition_layers(
    layer_costs: Sequence[float],
    num_stages: int,
    first_cost: float = 0.0,
    last_cost: float = 0.0,
    *,
    first_may_be_empty: bool = True,
    last_may_be_empty: bool = True,
) -> list[range]:
    """Consecutive layer ranges, one per stage, minimising the cost of the most expensive stage.

    Stage ``s`` costs the sum of its layers' costs, plus ``first_cost`` on the
    first stage and ``last_cost`` on the last. The first (last) stage may get
    no layer when ``first_may_be_empty`` (``last_may_be_empty``): it still
    holds the embeddings (head). Every middle stage gets at least one layer.
    Among the plans with the smallest maximum, the one with the smallest sum
    of squared stage costs wins, then the one with the fewest layers on the
    end stages, then the one with more layers on earlier stages (as
    :func:`~hf_pp.stage_math.split_layers_evenly`): the answer is deterministic.

    Example:
        >>> partition_layers([1, 1, 1, 1, 1, 1], 2, first_cost=0.5, last_cost=4)
        [range(0, 5), range(5, 6)]
        >>> partition_layers([1, 1, 1, 1], 4, first_cost=3, last_cost=3)
        [range(0, 0), range(0, 2), range(2, 4), range(4, 4)]
    """
    costs = [float(c) for c in layer_costs]
    n, num = len(costs), num_stages
    if num < 1:
        raise PipelineConfigError(f"num_stages must be at least 1, got {num_stages}.")
    if any(not math.isfinite(c) or c < 0 for c in [*costs, first_cost, last_cost]):
        raise PipelineConfigError("Stage costs must be finite and non-negative.")
    if num == 1:
        return [range(0, n)]
    least = [0 if (s == 0 and first_may_be_empty) or (s == num - 1 and last_may_be_empty) else 1 for s in range(num)]
    if sum(least) > n:
        raise PipelineConfigError(
            f"{num} stages over {n} layers would leave a stage empty (every stage but one holding the embeddings "
            f"or the head needs a layer); use at most {n + num - sum(least)} stages."
        )
    prefix = list(accumulate(costs, initial=0.0))

    def stage_cost(s: int, i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (first_cost if s == 0 else 0.0) + (last_cost if s == num - 1 else 0.0)

    bottleneck = _smallest_bottleneck(n, least, stage_cost)
    limit = bottleneck + 1e-9 * max(1.0, abs(bottleneck))  # float sums of the same costs may differ in the last bit
    return _best_under_limit(n, least, stage_cost, limit)


def _smallest_bottleneck(n: int, least: list[int], stage_cost: Callable[[int, int, int], float]) -> float:
    """The smallest possible cost of the most expensive stage (dynamic programme over cut points)."""
    best = [0.0] + [math.inf] * n  # best[j]: stages so far cover layers [0, j)
    for s, at_least in enumerate(least):
        new = [math.inf] * (n + 1)
        for j in range(n + 1):
            for i in range(j - at_least + 1):
                if best[i] < new[j]:
                    new[j] = min(new[j], max(best[i], stage_cost(s, i, j)))
        best = new
    return best[n]


def _best_under_limit(n: int, least: list[int], stage_cost: Callable[[int, int, int], float], limit: float) -> list[range]:
    """Among plans whose every stage costs at most ``limit``: smallest sum of squares, then fewest layers at the ends."""
    num = len(least)
    score: list[tuple[float, int] | None] = [(0.0, 0)] + [None] * n
    choices: list[list[int]] = []
    for s, at_least in enumerate(least):
        new: list[tuple[float, int] | None] = [None] * (n + 1)
        choice = [-1] * (n + 1)
        endness = abs(2 * s - (num - 1))
        for j in range(n + 1):
            for i in range(j - at_least + 1):
                cost = stage_cost(s, i, j)
                if score[i] is None or cost > limit:
                    continue
                candidate = (score[i][0] + cost * cost, score[i][1] + (j - i) * endness)
                if new[j] is None or candidate <= new[j]:  # ties: the later cut, so earlier stages hold more (as "layers")
                    new[j], choice[j] = candidate, i
        score = new
        choices.append(choice)
    ranges, j = [], n
    for s in reversed(range(num)):
        i = choices[s][j]
        ranges.append(range(i, j))
        j = i
    return ranges[::-1]


def _piece_groups(pieces: PlanPieces) -> list[list[str]]:
    """Module groups, one per piece: first, each layer, last (weightless helpers ride along with the last)."""
    return [list(pieces.first), *[[fqn] for fqn in pieces.layers], [*pieces.last, *pieces.every]]


def param_costs(model: nn.Module) -> PieceCosts:
    """Parameters each piece of the plan holds (a tied head counts where its copy lives). Meta-device models are fine.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
        >>> with torch.device("meta"):
        ...     costs = param_costs(LlamaForCausalLM(cfg))
        >>> costs.first, costs.layers, costs.last
        (16000, (2592, 2592), 16016)
    """
    held = [f.params_held for f in stage_facts(model, _piece_groups(plan_pieces(model)))]
    return PieceCosts(held[0], tuple(held[1:-1]), held[-1], "parameters")


def profile_seq_len(model: nn.Module, seq_len: int | None = None) -> int:
    """Sequence length to profile with: ``seq_len``, else :data:`DEFAULT_PROFILE_SEQ_LEN` capped by the model's positions.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                          num_attention_heads=2, max_position_embeddings=128))
        >>> profile_seq_len(model), profile_seq_len(model, 64)
        (128, 64)
    """
    from .architectures import max_positions

    limit = max_positions(model)
    if seq_len is None:
        return min(DEFAULT_PROFILE_SEQ_LEN, limit) if limit else DEFAULT_PROFILE_SEQ_LEN
    if seq_len < 1:
        raise PipelineConfigError(f"pp_balance_seq_len must be at least 1, got {seq_len}.")
    if limit is not None and seq_len > limit:
        raise PipelineConfigError(
            f"pp_balance_seq_len={seq_len} is longer than the model's max_position_embeddings={limit}; use at most {limit}."
        )
    return seq_len


def estimate_seq_len(model: nn.Module, seq_len: int | None = None) -> int:
    """Sequence length for the cost model of "auto": ``seq_len`` (capped by the model's positions: an estimate
    never refuses a length), else :data:`DEFAULT_PROFILE_SEQ_LEN` capped likewise.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                          num_attention_heads=2, max_position_embeddings=128))
        >>> estimate_seq_len(model), estimate_seq_len(model, 64), estimate_seq_len(model, 4096)
        (128, 64, 128)
    """
    if seq_len is None:
        return profile_seq_len(model)
    if seq_len < 1:
        raise PipelineConfigError(f"pp_balance_seq_len must be at least 1, got {seq_len}.")
    from .architectures import max_positions

    limit = max_positions(model)
    return min(seq_len, limit) if limit else seq_len


def can_balance(model: nn.Module) -> bool:
    """Does ``model`` have a pipeline plan hf_pp knows (a Hugging Face decoder it can split by itself)?

    Example:
        >>> can_balance(nn.Linear(2, 2))
        False
    """
    if getattr(model, "config", None) is None:
        return False
    try:
        plan_pieces(model)
    except PipelineConfigError:
        return False
    return True


def first_batch_seq_len(dataset: Any, collator: Callable | None, batch_size: int) -> int | None:
    """Length of the first training batch as ``collator`` pads it (else of the first sample); None if unknown.

    Example:
        >>> first_batch_seq_len([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], None, 2)
        3
    """
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        return None
    samples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    if collator is not None:
        with torch.random.fork_rng(devices=[]):  # a masking collator draws random numbers: keep training's
            try:
                batch = collator(samples)
            except Exception:  # noqa: BLE001 - e.g. raw columns Trainer would have removed: fall back to the samples
                batch = None
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if torch.is_tensor(ids) and ids.dim() == 2:
            return int(ids.shape[1])
    lengths = [len(s["input_ids"]) for s in samples if isinstance(s, Mapping) and hasattr(s.get("input_ids"), "__len__")]
    return max(lengths) if lengths else None


def balance_stages(
    model: nn.Module,
    pp_size: int,
    spec: ScheduleSpec,
    mode: str,
    *,
    layers_per_stage: int | None = None,
    round_to_pp_multiple: str | None = None,
    csv_path: str | None = None,
    microbatch_size: int = 1,
    seq_len: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> BalancedPlan:
    """The stage plan of a Hugging Face model balanced by ``mode`` (see the module docstring).

    The number of stages is the one the schedule and ``layers_per_stage``
    give anyway; only where the layers are cut changes. "auto" estimates
    microbatches of ``microbatch_size`` x ``seq_len`` tokens from the shapes
    (pure, the same on every rank); when the cost model cannot cost the model it
    warns, saying what is missing, and cuts as "layers" (the plan's ``mode``
    says "layers"). "time" profiles such microbatches on ``device`` and, under
    ``torch.distributed``, averages the times over the default process group (a
    collective: call it on every rank).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_pp.schedules import resolve_schedule
        >>> cfg = LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> with torch.device("meta"):
        ...     plan = balance_stages(LlamaForCausalLM(cfg), 4, resolve_schedule("1f1b"), "params")
        >>> [len(r) for r in plan.layer_ranges]
        [0, 2, 2, 0]
    """
    check_balance_mode(mode)
    if mode not in _KEEPS_EXPLICIT_PLAN and getattr(model, "config", None) is None:
        raise PipelineConfigError(
            f"pp_balance={mode!r} balances Hugging Face models along their pipeline plan; for "
            f"{type(model).__name__} pass module_fqns_per_model_part with pp_balance='layers'."
        )
    even, _ = plan_stage_fqns(model, pp_size, spec, layers_per_stage=layers_per_stage,
                              round_to_pp_multiple=round_to_pp_multiple, csv_path=csv_path)
    pieces = plan_pieces(model)
    costs = _piece_costs(model, mode, microbatch_size, seq_len, device, dtype)
    if costs is None:
        return BalancedPlan("layers", even, split_layers_evenly(len(pieces.layers), len(even)), None)
    ranges = partition_layers(costs.layers, len(even), costs.first, costs.last,
                              first_may_be_empty=bool(pieces.first), last_may_be_empty=bool(pieces.last))
    fqns = module_fqns_per_stage(model, len(even), ranges)
    validate_stage_fqns(model, fqns)
    plan = BalancedPlan(mode, fqns, ranges, costs)
    logger.info("pp_balance=%s: layers per stage %s, stage costs %s (%s)", mode, [len(r) for r in ranges],
                [f"{c:.4g}" for c in plan.stage_costs()], costs.unit)
    return plan


def _piece_costs(model: nn.Module, mode: str, microbatch_size: int, seq_len: int | None,
                 device: torch.device | str, dtype: torch.dtype | None) -> PieceCosts | None:
    """The costs ``mode`` balances on; None for "layers" (and for "auto" on a model it cannot cost, with a warning)."""
    if mode == "layers":
        return None
    if mode == "params":
        return param_costs(model)
    if mode == "time":
        from .profiling import time_costs

        return time_costs(model, microbatch_size=microbatch_size, seq_len=profile_seq_len(model, seq_len),
                          device=device, dtype=dtype)
    from .cost_model import CostModelError, flop_costs

    try:
        return flop_costs(model, microbatch_size=microbatch_size, seq_len=estimate_seq_len(model, seq_len))
    except CostModelError as err:  # every rank reads the same config: all of them fall back alike
        warnings.warn(f"{err}; cutting as pp_balance='layers' (the same number of layers per stage) instead.",
                      stacklevel=4)
        return None


def balanced_module_fqns(model: nn.Module, pp_size: int, spec: ScheduleSpec, mode: str,
                         **options: Any) -> list[list[str]] | None:
    """The plan to pass as ``module_fqns_per_model_part``; None where the default split stays.

    That is "layers", and "auto" wherever it would change nothing: a model hf_pp
    has no plan for (its own error then asks for ``module_fqns_per_model_part``),
    one the cost model cannot cost (with a warning), or a cut equal to the even
    split. ``options`` are those of :func:`balance_stages`.

    Example:
        >>> from hf_pp.schedules import resolve_schedule
        >>> balanced_module_fqns(nn.Linear(2, 2), 2, resolve_schedule("1f1b"), "layers") is None
        True
        >>> balanced_module_fqns(nn.Linear(2, 2), 2, resolve_schedule("1f1b"), "auto") is None
        True
    """
    if check_balance_mode(mode) == "layers" or (mode == "auto" and not can_balance(model)):
        return None
    plan = balance_stages(model, pp_size, spec, mode, **options)
    even = split_layers_evenly(sum(len(r) for r in plan.layer_ranges), len(plan.layer_ranges))
    if plan.mode == "layers" or (mode == "auto" and plan.layer_ranges == even):
        return None
    return plan.fqns_per_stage
