"""Pure arithmetic of a pipeline layout: which stages a rank owns, how many
virtual stages a model gets, and which module FQNs go to each stage.

Nothing here touches a model or a process group, so every rank computes the
same answer (and raises the same error) without communicating.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from .errors import PipelineConfigError

__all__ = [
    "stage_ids_this_rank",
    "calculate_virtual_stages",
    "split_layers_evenly",
    "generate_hf_model_fqn_per_model_part",
    "layered_model_fqns_per_stage",
    "check_layer_ranges",
]


def stage_ids_this_rank(
    pp_rank: int, pp_size: int, num_stages: int, style: Literal["loop", "v"] = "loop"
) -> tuple[int, ...]:
    """Global stage indices owned by ``pp_rank``.

    "loop" gives rank r the stages r, r + pp_size, r + 2 * pp_size, ...;
    "v" (ZBV / DualPipeV) gives rank r the stages r and 2 * pp_size - 1 - r.

    Example:
        >>> stage_ids_this_rank(0, 4, 8, style="loop")
        (0, 4)
        >>> stage_ids_this_rank(0, 4, 8, style="v")
        (0, 7)
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise PipelineConfigError(f"pp_rank must be in [0, {pp_size}), got {pp_rank} (pp_size={pp_size}).")
    if num_stages % pp_size != 0:
        raise PipelineConfigError(
            f"num_stages ({num_stages}) must be a multiple of pp_size ({pp_size}) so every rank "
            "owns the same number of stages."
        )
    stages_per_rank = num_stages // pp_size
    if style == "loop":
        return tuple(pp_rank + i * pp_size for i in range(stages_per_rank))
    if style == "v":
        if stages_per_rank != 2:
            raise PipelineConfigError(
                f"V-style placement needs exactly 2 stages per rank, got {stages_per_rank} "
                f"({num_stages} stages over {pp_size} ranks)."
            )
        return (pp_rank, num_stages - 1 - pp_rank)
    raise PipelineConfigError(f"Unknown stage style {style!r}; use 'loop' or 'v'.")


def calculate_virtual_stages(
    num_layers: int,
    layers_per_stage: int | None,
    pp_size: int,
    is_single_stage_schedule: bool,
    round_to_pp_multiple: Literal["up", "down"] | None = None,
) -> tuple[int, int]:
    """Number of pipeline stages in total and per rank.

    Without ``layers_per_stage``: one stage per rank for single-stage schedules
    (GPipe, 1F1B), two for multi-stage ones. With it: ``num_layers /
    layers_per_stage`` stages, which must divide evenly and be a multiple of
    ``pp_size``; ``round_to_pp_multiple`` ("up" or "down") instead rounds the
    stage count to the nearest multiple of ``pp_size`` and the layers are then
    spread as evenly as possible.

    Example:
        >>> calculate_virtual_stages(32, 4, 4, is_single_stage_schedule=False)
        (8, 2)
        >>> calculate_virtual_stages(26, 4, 4, False, round_to_pp_multiple="up")
        (8, 2)
    """
    if pp_size < 1:
        raise PipelineConfigError(f"pp_size must be at least 1, got {pp_size}.")
    if round_to_pp_multiple not in (None, "up", "down"):
        raise PipelineConfigError(
            f"round_to_pp_multiple must be None, 'up' or 'down', got {round_to_pp_multiple!r}."
        )
    if layers_per_stage is None:
        stages_per_rank = 1 if is_single_stage_schedule else 2
        num_virtual_stages = pp_size * stages_per_rank
    else:
        if layers_per_stage < 1:
            raise PipelineConfigError(f"layers_per_stage must be at least 1, got {layers_per_stage}.")
        num_virtual_stages = math.ceil(num_layers / layers_per_stage)
        uneven = num_layers % layers_per_stage != 0 or num_virtual_stages % pp_size != 0
        if uneven and round_to_pp_multiple is None:
            raise PipelineConfigError(
                f"{num_layers} layers at {layers_per_stage} per stage give {num_layers / layers_per_stage:g} "
                f"stages, which is not a whole multiple of pp_size={pp_size}. Choose layers_per_stage so that "
                f"num_layers / layers_per_stage is a multiple of pp_size, or set round_to_pp_multiple='up' "
                f"or 'down' to spread the layers unevenly."
            )
        if round_to_pp_multiple == "up":
            num_virtual_stages = math.ceil(num_virtual_stages / pp_size) * pp_size
        elif round_to_pp_multiple == "down":
            num_virtual_stages = max(pp_size, num_virtual_stages // pp_size * pp_size)
        stages_per_rank = num_virtual_stages // pp_size
    if num_virtual_stages > num_layers:
        raise PipelineConfigError(
            f"{num_virtual_stages} pipeline stages need at least as many layers, but the model has "
            f"{num_layers}. Use a smaller pp_size or fewer stages per rank (layers_per_stage)."
        )
    if is_single_stage_schedule and stages_per_rank != 1:
        raise PipelineConfigError(
            f"This schedule runs one stage per rank, but the layout gives {stages_per_rank} stages per rank. "
            "Use a multi-stage schedule (interleaved_1f1b, looped_bfs, interleaved_zero_bubble, zbv_zero_bubble, "
            "dual_pipe_v) or raise layers_per_stage."
        )
    if not is_single_stage_schedule and stages_per_rank < 2:
        raise PipelineConfigError(
            f"Multi-stage schedules need at least 2 stages per rank, but the layout gives {stages_per_rank}. "
            "Use 1f1b or gpipe, or lower layers_per_stage."
        )
    return num_virtual_stages, stages_per_rank


def split_layers_evenly(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, sizes differing by at most one.

    The remainder goes to the middle stages first: the first stage also runs
    the embeddings and the last one the LM head and loss, so they get the
    smaller share.

    Example:
        >>> [list(r) for r in split_layers_evenly(10, 4)]
        [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    """
    if num_stages < 1:
        raise PipelineConfigError(f"num_stages must be at least 1, got {num_stages}.")
    if num_layers < num_stages:
        raise PipelineConfigError(
            f"Cannot spread {num_layers} layers over {num_stages} stages: every stage needs at least one "
            "layer. Use fewer pipeline stages."
        )
    base, remainder = divmod(num_layers, num_stages)
    # Stage order for extra layers: middle outwards, ends last.
    order = sorted(range(num_stages), key=lambda s: (abs(2 * s - (num_stages - 1)), s))
    extra = set(order[:remainder])
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (stage in extra)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def generate_hf_model_fqn_per_model_part(
    num_stages: int,
    num_layers: int,
    include_embeddings: bool = True,
    include_lm_head: bool = True,
    include_rotary_emb: bool = True,
    fqn_prefix: str = "model.",
) -> list[list[str]]:
    """Module FQNs for each stage of a Llama-style Hugging Face model.

    Embeddings (``{prefix}embed_tokens``) go to the first stage only, the final
    norm and ``lm_head`` to the last only, ``{prefix}rotary_emb`` to every stage,
    and layers ``{prefix}layers.i`` as :func:`split_layers_evenly` spreads them.

    Example:
        >>> generate_hf_model_fqn_per_model_part(2, 4)[1]
        ['model.layers.2', 'model.layers.3', 'model.norm', 'lm_head', 'model.rotary_emb']
    """
    first = [f"{fqn_prefix}embed_tokens"] if include_embeddings else []
    last = [f"{fqn_prefix}norm"] + (["lm_head"] if include_lm_head else [])
    every = [f"{fqn_prefix}rotary_emb"] if include_rotary_emb else []
    layers = [f"{fqn_prefix}layers.{i}" for i in range(num_layers)]
    return layered_model_fqns_per_stage(num_stages, layers, first=first, last=last, every=every)


def layered_model_fqns_per_stage(
    num_stages: int,
    layer_fqns: Sequence[str],
    first: Sequence[str] = (),
    last: Sequence[str] = (),
    every: Sequence[str] = (),
    layer_ranges: Sequence[range] | None = None,
) -> list[list[str]]:
    """Stage FQN lists for any model made of a stack of layers.

    ``first`` modules go to the first stage, ``last`` ones to the last stage,
    ``every`` (weightless helpers) to all stages, and ``layer_fqns`` are spread
    in order by :func:`split_layers_evenly`, or as ``layer_ranges`` says (one
    range of layer indices per stage, see :func:`check_layer_ranges`). This is
    the plan to pass as ``module_fqns_per_model_part`` for a custom model.

    Example:
        >>> layered_model_fqns_per_stage(2, ["blocks.0", "blocks.1", "blocks.2"], first=["embed"], last=["head"])
        [['embed', 'blocks.0', 'blocks.1'], ['blocks.2', 'head']]
        >>> layered_model_fqns_per_stage(2, ["blocks.0", "blocks.1"], first=["embed"], last=["head"],
        ...                              layer_ranges=[range(0, 2), range(2, 2)])
        [['embed', 'blocks.0', 'blocks.1'], ['head']]
    """
    if layer_ranges is None:
        ranges = split_layers_evenly(len(layer_fqns), num_stages)
    else:
        ranges = check_layer_ranges(layer_ranges, len(layer_fqns), num_stages, first_holds_more=bool(first),
                                    last_holds_more=bool(last))
    parts = []
    for stage, layers in enumerate(ranges):
        fqns = list(first) if stage == 0 else []
        fqns += [layer_fqns[i] for i in layers]
        if stage == num_stages - 1:
            fqns += list(last)
        fqns += list(every)
        parts.append(fqns)
    return parts


def check_layer_ranges(
    layer_ranges: Sequence[range],
    num_layers: int,
    num_stages: int,
    *,
    first_holds_more: bool = False,
    last_holds_more: bool = False,
) -> list[range]:
    """Check that ``layer_ranges`` gives every layer to one stage, in order, and leaves no stage empty.

    A stage may get no layer only when it still holds something else: the
    first stage with ``first_holds_more`` (e.g. the embeddings), the last one
    with ``last_holds_more`` (e.g. the final norm and the LM head).

    Example:
        >>> check_layer_ranges([range(0, 0), range(0, 3)], 3, 2, first_holds_more=True)
        [range(0, 0), range(0, 3)]
        >>> check_layer_ranges([range(0, 3), range(3, 3), range(3, 4)], 4, 3)
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: Stage 1 of 3 would be empty: it gets no layer and holds nothing else. Use fewer pipeline stages, or a split that gives every middle stage at least one layer.
    """
    ranges = [range(r.start, r.stop) for r in layer_ranges]
    if len(ranges) != num_stages:
        raise PipelineConfigError(f"{len(ranges)} layer ranges given for {num_stages} stages; give one range per stage.")
    covered = [i for r in layer_ranges for i in r]
    if covered != list(range(num_layers)):
        raise PipelineConfigError(
            f"Layer ranges {[f'{r.start}-{r.stop - 1}' if r else 'none' for r in ranges]} do not give each of the "
            f"{num_layers} layers to exactly one stage in order; use consecutive ranges covering 0..{num_layers - 1}."
        )
    for stage, r in enumerate(ranges):
        holds_more = (stage == 0 and first_holds_more) or (stage == num_stages - 1 and last_holds_more)
        if not r and not holds_more:
            raise PipelineConfigError(
                f"Stage {stage} of {num_stages} would be empty: it gets no layer and holds nothing else. Use fewer "
                "pipeline stages, or a split that gives every middle stage at least one layer."
            )
    return ranges
