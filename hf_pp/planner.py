"""Dry-run planner: what a pipeline layout would look like, in one process.

Builds the model on the meta device (no weights, no download, no process
group), splits it with the same planning code that training uses, and
reports per stage and per rank the modules, parameters and the memory of
weights + gradients + AdamW state, the expected bubble, and a schedule PNG.
Run it as ``python -m hf_pp plan CONFIG_OR_MODEL_DIR --pp-size 4``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .balance import DEFAULT_BALANCE, BalancedPlan, balance_stages, check_balance_options, estimate_seq_len
from .cost_model import choose_microbatch_size, microbatch_step_estimate
from .errors import PipelineConfigError
from .functional import plan_stage_fqns
from .materialize import meta_model as build_meta_model
from .layout import StageFacts, compact_fqns, expected_bubble_fraction, stage_facts
from .schedules import resolve_schedule, validate_microbatches
from .stage_math import split_layers_evenly

__all__ = ["TINY_EXAMPLES", "load_config", "meta_model", "PipelinePlan", "plan_pipeline", "format_plan"]

# Built-in configs, so a plan (and the tests) need no download.
TINY_EXAMPLES = {
    "tiny-llama": dict(model_type="llama", num_hidden_layers=8, hidden_size=256, intermediate_size=688,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False),
    "tiny-llama-tied": dict(model_type="llama", num_hidden_layers=8, hidden_size=128, intermediate_size=344,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}
# Bytes of optimizer state per trainable parameter byte: AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
ADAMW_STATES = 2


def load_config(source: str):
    """A transformers config from a built-in example name, a config JSON file, a model directory or a hub id.

    Example:
        >>> load_config("tiny-llama").num_hidden_layers
        8
    """
    from transformers import AutoConfig

    if source in TINY_EXAMPLES:
        fields = dict(TINY_EXAMPLES[source])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise PipelineConfigError(f"{source!r} is a directory without config.json; point at a model directory.")
        return AutoConfig.from_pretrained(source, local_files_only=True)
    if os.path.isfile(source):
        with open(source) as f:
            fields = json.load(f)
        if "model_type" not in fields:
            raise PipelineConfigError(f"{source!r} has no 'model_type'; a Hugging Face config.json names its model type.")
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if "/" in source and not source.startswith((".", "/")):  # "org/name": a hub id, from the cache or the hub
        from .materialize import load_pretrained_config

        return load_pretrained_config(source)
    raise PipelineConfigError(
        f"{source!r} is neither a built-in example ({', '.join(TINY_EXAMPLES)}), a config JSON file, a model directory "
        "nor a hub id (org/name)."
    )


def meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model for ``config`` on the meta device (shapes and dtypes only, no memory), cast to ``dtype``:
    :func:`hf_pp.materialize.meta_model` (the classifier ``architectures`` names, else the CausalLM)."""
    model = build_meta_model(config)
    return model.to(dtype) if dtype is not None else model


@dataclass
class PipelinePlan:
    """Everything :func:`format_plan` prints; memory in bytes."""

    model_name: str
    schedule: str
    pp_size: int
    n_microbatches: int
    fqns_per_stage: list[list[str]]
    stage_ids_per_rank: list[tuple[int, ...]]
    facts: list[StageFacts]
    expected_bubble: float
    simulated_bubble: float
    picture: str | None
    balance: BalancedPlan | None = None
    # With balance="layers": the even split costed by "auto"'s model, and the cut "auto" would choose.
    estimate: BalancedPlan | None = None
    auto: BalancedPlan | None = None
    estimate_tokens: tuple[int, int] | None = None  # (microbatch size, sequence length) the FLOPs are for
    # With batch_size: (batch, the microbatch size chosen for it, its estimated step / microbatch 1's).
    microbatch_choice: tuple[int, int, float] | None = None

    def stage_memory(self, stage: int) -> dict[str, int]:
        f = self.facts[stage]
        mem = {"weights": f.bytes_held, "grads": f.trainable_bytes_held, "adamw": ADAMW_STATES * f.trainable_bytes_held}
        mem["total"] = sum(mem.values())
        return mem

    def rank_memory(self, rank: int) -> int:
        return sum(self.stage_memory(s)["total"] for s in self.stage_ids_per_rank[rank])


def plan_pipeline(
    model: nn.Module,
    pp_size: int,
    schedule: str | None = "1f1b",
    *,
    layers_per_stage: int | None = None,
    n_microbatches: int | None = None,
    schedule_csv: str | None = None,
    round_to_pp_multiple: str | None = None,
    module_fqns_per_model_part: Sequence[Sequence[str]] | None = None,
    picture: str | None = None,
    balance: str = DEFAULT_BALANCE,
    balance_seq_len: int | None = None,
    balance_microbatch_size: int = 1,
    batch_size: int | None = None,
) -> PipelinePlan:
    """Plan ``model`` (any device, meta is fine) over ``pp_size`` ranks; optionally write the schedule PNG.

    ``balance`` is ``pp_balance`` ("auto", "layers", "params" or "time"; see
    :mod:`hf_pp.balance`), for microbatches of ``balance_microbatch_size`` x
    ``balance_seq_len`` tokens. "auto" estimates FLOPs from the shapes (as
    training does); "layers" keeps the even split and also reports "auto"'s
    estimate of it and the cut "auto" would choose. "time" profiles each piece
    here, on this machine's CPU: the figures are relative costs, not a forecast
    for other hardware.

    ``batch_size`` (per pipeline, instead of ``n_microbatches``) plans the
    microbatches ``PipelineTrainingArguments`` chooses when ``pp_microbatch_size``
    is unset (:func:`hf_pp.cost_model.choose_microbatch_size`, at ``balance_seq_len``
    tokens or 512).

    Example:
        >>> plan = plan_pipeline(meta_model(load_config("tiny-llama")), pp_size=2)
        >>> plan.fqns_per_stage[1][-3:], f"{plan.expected_bubble:.3f}"
        (['model.norm', 'lm_head', 'model.rotary_emb'], '0.200')
    """
    from .visualize import bubble_of, draw_schedule, schedule_ops, simulate

    if pp_size < 1:
        raise PipelineConfigError(f"pp_size must be at least 1, got {pp_size}.")
    spec = resolve_schedule(schedule, schedule_csv)
    check_balance_options(balance, module_fqns_per_model_part, balance_seq_len)
    balanced = auto = estimate = None
    options = dict(layers_per_stage=layers_per_stage, round_to_pp_multiple=round_to_pp_multiple, csv_path=schedule_csv,
                   microbatch_size=balance_microbatch_size, seq_len=balance_seq_len)
    if module_fqns_per_model_part is None and balance != "layers":
        balanced = balance_stages(model, pp_size, spec, balance, **options)
        module_fqns_per_model_part = balanced.fqns_per_stage
    elif module_fqns_per_model_part is None and getattr(model, "config", None) is not None:
        auto = balance_stages(model, pp_size, spec, "auto", **options)
        estimate = BalancedPlan("layers", auto.fqns_per_stage, split_layers_evenly(len(auto.costs.layers),
                                len(auto.layer_ranges)), auto.costs) if auto.costs is not None else None
    tokens = (balance_microbatch_size, estimate_seq_len(model, balance_seq_len)) if balance in ("auto", "layers") \
        and getattr(model, "config", None) is not None else None
    fqns, ranks = plan_stage_fqns(
        model, pp_size, spec, layers_per_stage=layers_per_stage, module_fqns_per_model_part=module_fqns_per_model_part,
        round_to_pp_multiple=round_to_pp_multiple, csv_path=schedule_csv,
    )
    per_rank = len(ranks[0])
    choice = None
    if batch_size is not None:
        if n_microbatches is not None:
            raise PipelineConfigError("Give the planner a batch size or a number of microbatches, not both.")
        seq = balance_seq_len or 512
        b = choose_microbatch_size(batch_size, pp_size, seq, schedule=schedule, schedule_csv=schedule_csv,
                                   stages_per_rank=per_rank)
        chosen, one = (microbatch_step_estimate(batch_size, size, pp_size, seq, stages_per_rank=per_rank)
                       for size in (b, 1))
        choice, n_microbatches = (batch_size, b, chosen / one), batch_size // b
    m = n_microbatches if n_microbatches is not None else max(2 * pp_size, len(fqns))
    validate_microbatches(spec, m, 1, pp_size, per_rank)
    ops = schedule_ops(spec.name if spec.name != "csv" else None, pp_size, m, per_rank, csv_path=schedule_csv)
    simulated = bubble_of(simulate(ops))
    if picture is not None:
        title = f"{spec.name}: pp={pp_size}, {len(fqns)} stages, {m} microbatches"
        draw_schedule(ops, picture, title=title)
    return PipelinePlan(
        model_name=type(model).__name__, schedule=spec.name, pp_size=pp_size, n_microbatches=m, fqns_per_stage=fqns,
        stage_ids_per_rank=list(ranks), facts=stage_facts(model, fqns),
        expected_bubble=expected_bubble_fraction(pp_size, m, per_rank), simulated_bubble=simulated, picture=picture,
        balance=balanced, estimate=estimate, auto=auto, estimate_tokens=tokens, microbatch_choice=choice,
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def format_plan(plan: PipelinePlan, max_modules: int = 6) -> str:
    """The plan as a plain-text report (stage table, per-rank memory, bubble)."""
    total = max(1, sum(f.params for f in plan.facts))
    stage_rank = {s: r for r, ids in enumerate(plan.stage_ids_per_rank) for s in ids}
    v = len(plan.fqns_per_stage) // plan.pp_size
    lines = [
        f"{plan.model_name}: {total:,} parameters; schedule {plan.schedule}, pp_size {plan.pp_size}, "
        f"{len(plan.fqns_per_stage)} stages ({v} per rank), {plan.n_microbatches} microbatches",
        "",
        f"{'stage':>5} {'rank':>4} {'params':>13} {'share':>6} {'weights':>9} {'grads':>9} {'AdamW':>9} {'total':>9}  modules",
    ]
    for s, fqns in enumerate(plan.fqns_per_stage):
        f, mem = plan.facts[s], plan.stage_memory(s)
        mods = compact_fqns(fqns)
        shown = ", ".join(mods[:max_modules]) + (f", ... (+{len(mods) - max_modules})" if len(mods) > max_modules else "")
        lines.append(f"{s:>5} {stage_rank[s]:>4} {f.params:>13,} {f.params / total:>6.1%} {_mib(mem['weights']):>9} "
                     f"{_mib(mem['grads']):>9} {_mib(mem['adamw']):>9} {_mib(mem['total']):>9}  {shown}")
    lines += ["", "memory per rank (MiB, weights + grads + AdamW state; activations not included):"]
    lines += [f"  rank {r}: {_mib(plan.rank_memory(r))}" for r in range(plan.pp_size)]
    lines += [
        "",
        f"expected bubble: {plan.expected_bubble:.1%} ((p-1)/(v*m+p-1) with p={plan.pp_size}, v={v}, "
        f"m={plan.n_microbatches}); in the drawn schedule: {plan.simulated_bubble:.1%}",
    ]
    if plan.microbatch_choice is not None:
        batch, b, ratio = plan.microbatch_choice
        lines.append(f"microbatch size chosen for a batch of {batch}: {b} ({batch // b} microbatches); estimated step "
                     f"{ratio:.1%} of microbatches of 1 (fixed cost per microbatch against the bubble)")
    lines += _balance_lines(plan)
    if plan.picture:
        lines.append(f"schedule picture: {plan.picture}")
    return "\n".join(lines)


# How each unit of hf_pp.balance.PieceCosts is printed, and what it measures.
_SHOW = {"seconds": lambda c: f"{c * 1e3:.2f} ms", "flops": lambda c: f"{c / 1e9:,.3f} GFLOP",
         "parameters": lambda c: f"{c:,.0f}"}
_WHAT = {"seconds": "estimated forward+backward per microbatch", "parameters": "parameters held",
         "flops": "estimated forward+backward FLOPs per microbatch"}


def _balance_lines(plan: PipelinePlan) -> list[str]:
    """Layers and cost of every stage, against the even split ("layers": against the cut "auto" would choose)."""
    tokens = plan.estimate_tokens
    where = f" ({tokens[0]} x {tokens[1]} tokens; memory-bound work included)" if tokens else ""
    if plan.estimate is not None and plan.auto is not None:
        header = f"pp_balance=layers: {_WHAT['flops']} per stage, as pp_balance=auto estimates it{where}"
        return _compare_lines(header, plan.estimate, plan.estimate.layer_ranges, plan.auto.layer_ranges,
                              "with pp_balance=auto")
    balanced = plan.balance
    if balanced is None or balanced.costs is None:
        return []
    header = f"pp_balance={balanced.mode}: {_WHAT[balanced.costs.unit]} per stage{where if balanced.mode == 'auto' else ''}"
    even = split_layers_evenly(len(balanced.costs.layers), len(balanced.layer_ranges))
    return _compare_lines(header, balanced, balanced.layer_ranges, even, "with layers spread evenly")


def _compare_lines(header: str, plan: BalancedPlan, ranges: list[range], other: list[range], other_name: str) -> list[str]:
    """Each stage's layers and cost under ``ranges`` and under ``other``, then the bottleneck stage of both."""
    unit = plan.costs.unit
    show = _SHOW[unit]
    costs, other_costs = plan.costs.stage_costs(ranges), plan.costs.stage_costs(other)
    lines = ["", header]
    lines += [f"  stage {s}: {len(r)} layers, {show(c)}   ({other_name}: {len(o)} layers, {show(oc)})"
              for s, (r, c, o, oc) in enumerate(zip(ranges, costs, other, other_costs))]
    worst, other_worst = max(costs), max(other_costs)
    change = 1 - worst / other_worst if other_worst > 0 else 0.0
    relative = f"{change:.0%} less" if change >= 0 else f"{-change:.0%} more"
    which = "largest" if unit == "parameters" else "slowest"
    lines.append(f"  {which} stage {show(worst)} (stage {costs.index(worst)}); {other_name} {show(other_worst)} "
                 f"(stage {other_costs.index(other_worst)}) ({relative})")
    return lines
