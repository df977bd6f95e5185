"""Facts about a whole pipeline layout, computed in one process from the
unsplit model and the stage plan: parameters per stage, bytes per stage,
expected bubble, and compact module lists for printing.

Nothing here touches a process group, so :class:`hf_pp.AutoPipeline` can
answer questions about every stage on any rank, and the planner can answer
them before any process group exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

__all__ = ["StageFacts", "stage_facts", "expected_bubble_fraction", "compact_fqns"]


@dataclass(frozen=True)
class StageFacts:
    """Parameters of one stage.

    ``params`` counts a tied weight once (on the stage holding its first name),
    so the stages add up to the unsplit model's count; ``params_held`` and
    ``bytes_held`` count what the stage really stores, tied copies included.
    """

    params: int
    trainable_params: int
    params_held: int
    bytes_held: int
    trainable_bytes_held: int


def _owner(name: str, fqns_per_stage: Sequence[Sequence[str]]) -> int:
    for stage, fqns in enumerate(fqns_per_stage):
        if any(name == f or name.startswith(f + ".") for f in fqns):
            return stage
    raise ValueError(f"parameter {name!r} is on no stage")  # validate_stage_fqns ran before


def stage_facts(model: nn.Module, fqns_per_stage: Sequence[Sequence[str]]) -> list[StageFacts]:
    """Per-stage parameter counts and bytes of ``model`` split as ``fqns_per_stage``.

    Works on a meta-device model (only shapes and dtypes are read).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> [f.params for f in stage_facts(net, [["0"], ["1"]])]
        [20, 10]
    """
    counted: set[int] = set()
    held: list[set[int]] = [set() for _ in fqns_per_stage]
    params = [0] * len(fqns_per_stage)
    trainable = [0] * len(fqns_per_stage)
    held_n = [0] * len(fqns_per_stage)
    held_b = [0] * len(fqns_per_stage)
    held_tb = [0] * len(fqns_per_stage)
    for name, p in model.named_parameters(remove_duplicate=False):
        stage = _owner(name, fqns_per_stage)
        if id(p) not in counted:  # the first name of a tied group owns the count
            counted.add(id(p))
            params[stage] += p.numel()
            trainable[stage] += p.numel() if p.requires_grad else 0
        if id(p) not in held[stage]:  # each stage holds its own copy
            held[stage].add(id(p))
            nbytes = p.numel() * p.element_size()
            held_n[stage] += p.numel()
            held_b[stage] += nbytes
            held_tb[stage] += nbytes if p.requires_grad else 0
    return [StageFacts(*row) for row in zip(params, trainable, held_n, held_b, held_tb)]


def expected_bubble_fraction(pp_size: int, n_microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a step: ``(p-1)/(m+p-1)``, interleaved ``(p-1)/(v*m+p-1)``.

    Zero-bubble schedules do better than this bound; the schedule picture
    (:func:`hf_pp.visualize.simulate`) gives their figure.

    Example:
        >>> round(expected_bubble_fraction(4, 8), 4), round(expected_bubble_fraction(4, 8, 2), 4)
        (0.2727, 0.1579)
    """
    p, m, v = pp_size, n_microbatches, stages_per_rank
    return (p - 1) / (v * m + p - 1)


_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def compact_fqns(fqns: Sequence[str]) -> list[str]:
    """Runs of consecutive layers shown as one range, order kept.

    Example:
        >>> compact_fqns(["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm"])
        ['model.embed_tokens', 'model.layers.0-2', 'model.norm']
    """
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # (prefix, first index, last index)

    def flush():
        if run is not None:
            prefix, a, b = run
            out.append(f"{prefix}.{a}" if a == b else f"{prefix}.{a}-{b}")

    for fqn in fqns:
        match = _INDEXED.match(fqn)
        if match and run is not None and match.group(1) == run[0] and int(match.group(2)) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            continue
        flush()
        run = None
        if match:
            run = (match.group(1), int(match.group(2)), int(match.group(2)))
        else:
            out.append(fqn)
    flush()
    return out
