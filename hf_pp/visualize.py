"""Pictures of pipeline schedules, computed in one process.

The order of work on each rank comes from torch (a schedule's
``pipeline_order``, or a CSV file); only for GPipe and 1F1B, whose torch
order table is not what they run, is it restated here from their
``_step_microbatches``. :func:`simulate` then places every operation in time
by its data dependencies (forward = 1 unit, full backward = 2, input- and
weight-gradient halves 1 each), and :func:`draw_schedule` draws the result
with matplotlib: one row per rank, idle time hatched.
"""

from __future__ import annotations

import csv
from typing import NamedTuple, Sequence

from torch.distributed.pipelining.schedules import _Action, _ComputationType as CT, PipelineScheduleSingle, ScheduleGPipe

from .errors import PipelineConfigError
from .schedules import resolve_schedule

__all__ = ["Op", "Slot", "schedule_ops", "ops_from_schedule", "simulate", "bubble_of", "draw_schedule"]

COSTS = {"F": 1, "B": 2, "I": 1, "W": 1}
_KIND = {CT.FORWARD: "F", CT.FULL_BACKWARD: "B", CT.BACKWARD_INPUT: "I", CT.BACKWARD_WEIGHT: "W"}
_COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}
_LEGEND = {"F": "forward", "B": "backward (full)", "I": "backward, input grad", "W": "backward, weight grad"}


class Op(NamedTuple):
    """One unit of compute: kind F/B/I/W, global stage, microbatch; ``overlap`` for DualPipeV's fused F+B."""

    kind: str
    stage: int
    microbatch: int
    overlap: bool = False


class Slot(NamedTuple):
    start: int
    duration: int
    op: Op


def _from_actions(actions: Sequence[_Action | None]) -> list[Op]:
    ops = []
    for action in actions:
        if action is None:
            continue
        if action.computation_type == CT.OVERLAP_F_B:
            ops += [Op(_KIND[a.computation_type], a.stage_index, a.microbatch_index, True) for a in action.sub_actions]
        elif action.computation_type in _KIND:  # communication and REDUCE_GRAD take no compute slot
            ops.append(Op(_KIND[action.computation_type], action.stage_index, action.microbatch_index))
    return ops


def _single_stage_ops(gpipe: bool, pp_size: int, n_microbatches: int) -> list[list[Op]]:
    """What ScheduleGPipe / Schedule1F1B run on each rank (warm-up of pp_size - rank forwards for 1F1B)."""
    out = []
    for rank in range(pp_size):
        fwd = [Op("F", rank, m) for m in range(n_microbatches)]
        bwd = [Op("B", rank, m) for m in range(n_microbatches)]
        if gpipe:
            out.append(fwd + bwd)
            continue
        warmup = min(n_microbatches, pp_size - rank)
        ops = fwd[:warmup]
        for i in range(n_microbatches - warmup):
            ops += [bwd[i], fwd[warmup + i]]
        out.append(ops + bwd[n_microbatches - warmup:])
    return out


def _csv_ops(csv_path: str, pp_size: int) -> list[list[Op]]:
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f)]
    if len(rows) != pp_size:
        raise PipelineConfigError(f"Schedule CSV {csv_path!r} has {len(rows)} rows but pp_size is {pp_size}.")
    return [_from_actions([_Action.from_str(cell) for cell in row]) for row in rows]


def schedule_ops(
    name: str | None, pp_size: int, n_microbatches: int, stages_per_rank: int | None = None, csv_path: str | None = None
) -> list[list[Op]]:
    """The compute operations of each rank, in order, for a named or CSV schedule (no process group).

    Example:
        >>> [op.kind + str(op.microbatch) for op in schedule_ops("1f1b", 2, 3)[1]]
        ['F0', 'B0', 'F1', 'B1', 'F2', 'B2']
    """
    if csv_path is not None:
        return _csv_ops(csv_path, pp_size)
    spec = resolve_schedule(name)
    if spec.single_stage:
        return _single_stage_ops(spec.schedule_class is ScheduleGPipe, pp_size, n_microbatches)
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    rows = get_schedule_ops(spec.schedule_class, pp_size, n_microbatches, stages_per_rank or 2)
    return [_from_actions(row) for row in rows]


def ops_from_schedule(schedule, pp_size: int) -> list[list[Op]]:
    """The compute operations of each rank of a built torch schedule."""
    if isinstance(schedule, PipelineScheduleSingle):
        return _single_stage_ops(isinstance(schedule, ScheduleGPipe), pp_size, schedule._n_microbatches)
    order = schedule.pipeline_order
    return [_from_actions(order.get(rank, [])) for rank in range(pp_size)]


def simulate(ops: Sequence[Sequence[Op]]) -> list[list[Slot]]:
    """Place each rank's operations in time, in their order, as soon as their inputs exist.

    Example:
        >>> [[(s.start, s.op.kind) for s in row] for row in simulate(schedule_ops("gpipe", 2, 1))]
        [[(0, 'F'), (4, 'B')], [(1, 'F'), (2, 'B')]]
    """
    num_stages = 1 + max((op.stage for row in ops for op in row), default=-1)
    done: dict[tuple[str, int, int], int] = {}
    slots: list[list[Slot]] = [[] for _ in ops]
    free = [0] * len(ops)
    nxt = [0] * len(ops)

    def ready(op: Op) -> int | None:
        if op.kind == "F":
            deps = [("F", op.stage - 1, op.microbatch)] if op.stage > 0 else []
        elif op.kind == "W":
            deps = [("I", op.stage, op.microbatch)]
        elif op.stage == num_stages - 1:
            deps = [("F", op.stage, op.microbatch)]
        else:  # the gradient of the next stage, from a full or an input backward
            after = [done.get((k, op.stage + 1, op.microbatch)) for k in ("B", "I")]
            return min((t for t in after if t is not None), default=None)
        times = [done.get(d) for d in deps]
        return None if None in times else max(times, default=0)

    remaining = sum(len(row) for row in ops)
    while remaining:
        progressed = False
        for rank, row in enumerate(ops):
            while nxt[rank] < len(row):
                op = row[nxt[rank]]
                t = ready(op)
                if t is None:
                    break
                start, cost = max(t, free[rank]), COSTS[op.kind]
                slots[rank].append(Slot(start, cost, op))
                done[(op.kind, op.stage, op.microbatch)] = free[rank] = start + cost
                nxt[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(row[nxt[r]]) for r, row in enumerate(ops) if nxt[r] < len(row)}
            raise PipelineConfigError(f"The schedule cannot make progress; each rank waits on: {stuck}.")
    return slots


def bubble_of(slots: Sequence[Sequence[Slot]]) -> float:
    """Share of rank-time spent idle in a simulated schedule.

    Example:
        >>> round(bubble_of(simulate(schedule_ops("1f1b", 4, 8))), 4)   # (p-1)/(m+p-1)
        0.2727
    """
    end = max((s.start + s.duration for row in slots for s in row), default=0)
    busy = sum(s.duration for row in slots for s in row)
    return 1.0 - busy / (end * len(slots)) if end else 0.0


def _shade(color: str, chunk: int) -> tuple:
    """Later virtual stages of a rank in lighter tints of their kind's colour."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    mix = min(0.55, 0.3 * chunk)
    return (r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix)


def draw_schedule(ops: Sequence[Sequence[Op]], filename: str, title: str | None = None) -> str:
    """Draw the schedule as a PNG: rows are ranks, columns time, idle time hatched; returns ``filename``."""
    # A Figure on its own Agg canvas: never touches pyplot's global backend (inline plots in notebooks stay inline).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    slots = simulate(ops)
    pp_size = len(slots)
    end = max((s.start + s.duration for row in slots for s in row), default=1)
    unit = max(0.14, min(0.42, 28.0 / end))  # inches per time unit: wide schedules get narrower cells
    fig_w, fig_h = max(6.0, end * unit + 2.2), 1.6 + 0.62 * pp_size
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    font = 8 if unit >= 0.3 else 6.5 if unit >= 0.2 else 5
    for rank, row in enumerate(slots):
        y = pp_size - 1 - rank
        ax.add_patch(Rectangle((0, y + 0.05), end, 0.9, facecolor="#f1f1f1", edgecolor="#bbbbbb", hatch="///", lw=0))
        for start, duration, op in row:
            chunk = op.stage // pp_size
            ax.add_patch(Rectangle((start, y + 0.05), duration, 0.9, facecolor=_shade(_COLORS[op.kind], chunk),
                                   edgecolor="black", lw=1.6 if op.overlap else 0.5))
            label = f"{op.kind}{op.microbatch}" + (f"\ns{op.stage}" if unit >= 0.2 else "")
            ax.text(start + duration / 2, y + 0.5, label, ha="center", va="center", fontsize=font,
                    color="white" if chunk == 0 else "black", linespacing=0.95)
    ax.set_xlim(0, end)
    ax.set_ylim(0, pp_size)
    ax.set_yticks([pp_size - 1 - r + 0.5 for r in range(pp_size)], [f"rank {r}" for r in range(pp_size)])
    ax.set_xlabel("time (forward = 1 unit, full backward = 2)")
    step = max(1, round(end / 24))
    ax.set_xticks(range(0, end + 1, step))
    ax.tick_params(axis="x", labelsize=7)
    kinds = [k for k in _COLORS if any(s.op.kind == k for row in slots for s in row)]
    handles = [Patch(facecolor=_COLORS[k], label=_LEGEND[k]) for k in kinds]
    handles.append(Patch(facecolor="#f1f1f1", edgecolor="#bbbbbb", hatch="///", label="idle (bubble)"))
    if any(s.op.overlap for row in slots for s in row):
        handles.append(Patch(facecolor="white", edgecolor="black", lw=1.6, label="overlapped F+B"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7.5, frameon=False)
    head = f"{title}  |  " if title else ""
    ax.set_title(f"{head}bubble {bubble_of(slots):.1%}; cell = kind+microbatch, s = stage", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(rect=(0, 0.32 / fig_h, 1, 1))  # room for the legend below the axis
    fig.savefig(filename)
    return filename
