"""Tied weights across pipeline stages (e.g. input embeddings tied to the LM head).

When a model ties ``lm_head.weight`` to ``model.embed_tokens.weight``, the
first stage holds one copy and the last stage another. Each copy only sees
the gradient of its own use, but the tied parameter's gradient is their sum;
:func:`sync_tied_gradients` adds the copies' gradients up (locally, then over
a small process group of just the ranks holding copies) and gives every copy
the sum. With the same optimizer on every copy, copies then stay bitwise equal.

Call :func:`plan_tied_weights` once at setup on **every** rank of the
pipeline group (it creates the subgroups, a collective over the world), and
:func:`sync_tied_gradients` after every backward, before clipping and the
optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from .mesh import pp_axis
from .split import tied_parameter_groups

__all__ = ["TiedWeights", "plan_tied_weights", "sync_tied_gradients", "make_tied_gradient_sync", "pipelines_of_mesh"]


@dataclasses.dataclass
class TiedWeights:
    """Which tied FQN groups exist and which process group sums each one's gradients.

    ``groups[i]`` lists the FQNs of one shared parameter; ``ranks[i]`` the
    global ranks holding a copy; ``process_groups[i]`` spans those ranks
    (``None`` when one rank holds every copy: then the sum is local).
    """

    groups: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    ranks: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    process_groups: list[dist.ProcessGroup | None] = dataclasses.field(default_factory=list)


def _on_stage(name: str, fqns: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fqns)


def plan_tied_weights(model: nn.Module, fqns_per_stage: Sequence[Sequence[str]],
                      stage_ids_per_rank: Sequence[Sequence[int]], pp_group: dist.ProcessGroup | None = None,
                      replica_pp_ranks: Sequence[Sequence[int]] | None = None) -> TiedWeights:
    """Find tied parameters split across stages; make one subgroup per set of ranks holding copies.

    ``stage_ids_per_rank[r]`` are the stages of pipeline rank ``r`` (see
    :func:`hf_pp.functional.plan_stage_fqns`); pipeline ranks map to global
    ranks through ``pp_group`` (the default group when ``None``). With data
    parallelism pass ``replica_pp_ranks``, the global ranks of every replica's
    pipeline: each replica gets its own subgroups. Must run on every rank, in
    the same order, because ``dist.new_group`` is collective.

    Example (no process group needed when one rank holds every stage)::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
        >>> fqns = [["model.embed_tokens", "model.layers.0"], ["model.layers.1", "model.norm", "lm_head"]]
        >>> plan_tied_weights(LlamaForCausalLM(cfg), fqns, [(0, 1)]).groups
        [('model.embed_tokens.weight', 'lm_head.weight')]
    """
    if replica_pp_ranks is None:
        replica_pp_ranks = [dist.get_process_group_ranks(pp_group or dist.group.WORLD) if dist.is_initialized() else [0]]
    me = dist.get_rank() if dist.is_initialized() else 0
    tied = TiedWeights()
    made: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    groups = tied_parameter_groups(model)
    for pp_ranks in replica_pp_ranks:
        for group in groups:
            stages = {s for s, fqns in enumerate(fqns_per_stage) for name in group if _on_stage(name, fqns)}
            holders = tuple(sorted({pp_ranks[r] for r, ids in enumerate(stage_ids_per_rank) if stages & set(ids)}))
            if len(stages) < 2:
                continue  # one stage holds the one shared Parameter: nothing to keep in sync
            if holders not in made:
                # Collective over the world: every rank creates every subgroup, in the same order.
                made[holders] = dist.new_group(list(holders)) if len(holders) > 1 else None
            if me in pp_ranks:
                tied.groups.append(tuple(group))
                tied.ranks.append(holders)
                tied.process_groups.append(made[holders])
    return tied


def pipelines_of_mesh(world_mesh: DeviceMesh, pp_axis_name: str) -> list[list[int]]:
    """Global ranks of every pipeline in ``world_mesh``, in pipeline-rank order: the ``replica_pp_ranks``.

    A pipeline is the slice along the pp axis at one coordinate of all the
    other axes (data parallel, or any other), whatever the order of the axes.
    Pure: reads the mesh's rank table, runs no collective. Example::

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))   # rank = dp * 2 + pp
        pipelines_of_mesh(mesh, "pp")   # [[0, 1], [2, 3]]; with ("pp", "dp"): [[0, 2], [1, 3]]
    """
    pp_axis(world_mesh, pp_axis_name)  # a clear error when the axis is missing
    ranks = world_mesh.mesh.movedim(world_mesh.mesh_dim_names.index(pp_axis_name), -1)
    return ranks.reshape(-1, ranks.shape[-1]).tolist()


def sync_tied_gradients(parts: Sequence[nn.Module], tied: TiedWeights) -> None:
    """Give every local copy of a tied parameter the sum of all copies' gradients (in place).

    Runs on every rank after backward; ranks holding no copy of a group do
    nothing for it. A copy without a gradient counts as zeros.

    Example:
        >>> a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        >>> _ = b.weight.data.copy_(a.weight.data)
        >>> a.weight.grad, b.weight.grad = torch.ones(2, 2), 2 * torch.ones(2, 2)
        >>> sync_tied_gradients([nn.ModuleDict({"emb": a}), nn.ModuleDict({"head": b})],
        ...                     TiedWeights([("emb.weight", "head.weight")], [(0,)], [None]))
        >>> a.weight.grad[0, 0].item(), b.weight.grad[0, 0].item()
        (3.0, 3.0)
    """
    local = {}
    for part in parts:
        for name, param in part.named_parameters(remove_duplicate=False):
            local.setdefault(name, []).append(param)
    for group, ranks, pg in zip(tied.groups, tied.ranks, tied.process_groups):
        # Frozen copies (e.g. the base embedding under PEFT) take no gradient at all.
        copies = {id(p): p for name in group for p in local.get(name, []) if p.requires_grad}
        if not copies:
            continue
        params = list(copies.values())
        # FSDP: the copies are sharded alike within a replica, so their local shards add up.
        total = torch.zeros_like(_local(params[0].detach()))
        for param in params:
            if param.grad is not None:
                total += _local(param.grad)
        if pg is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pg)
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            _local(param.grad).copy_(total)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def make_tied_gradient_sync(
    model: nn.Module,
    fqns_per_stage: Sequence[Sequence[str]],
    stage_ids_per_rank: Sequence[Sequence[int]],
    parts: Sequence[nn.Module],
    pp_group: dist.ProcessGroup | None,
    replica_pp_ranks: Sequence[Sequence[int]] | None = None,
):
    """The once-per-step tied-gradient sum for this rank's ``parts``, or None when nothing is tied across stages.

    Plans the subgroups (collective: call on every rank at setup) and returns
    a no-argument callable for the trainer or AutoPipeline to run after
    backward and before clipping.
    """
    tied = plan_tied_weights(model, fqns_per_stage, stage_ids_per_rank, pp_group, replica_pp_ranks)
    if not tied.groups:
        return None
    return lambda: sync_tied_gradients(parts, tied)
