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
optimizer step. Or let the schedule do it: :func:`sync_tied_grads_in_step`
makes one schedule instance's ``step`` sum the gradient that step added, so
the plain loop ``schedule.step(...)``, ``optimizer.step()`` is right, with
gradient accumulation over several steps too
(:func:`hf_pp.functional.pipeline_model` does this by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from .errors import PipelineConfigError
from .mesh import pp_axis
from .split import tied_parameter_groups

__all__ = [
    "TiedWeights",
    "TiedGradientSync",
    "plan_tied_weights",
    "sync_tied_gradients",
    "make_tied_gradient_sync",
    "pipelines_of_mesh",
    "sync_tied_grads_in_step",
    "tied_gradient_sync_of",
    "detach_tied_gradient_sync",
]

# The instance attribute of a schedule whose step sums tied gradients: the sync it runs.
_SYNC_ATTR = "_hf_pp_tied_gradient_sync"


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
    for group_copies, pg in zip(_trainable_copies(parts, tied), tied.process_groups):
        if not group_copies:
            continue
        # FSDP: the copies are sharded alike within a replica, so their local shards add up.
        total = torch.zeros_like(_local(group_copies[0].detach()))
        for param in group_copies:
            if param.grad is not None:
                total += _local(param.grad)
        if pg is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pg)
        for param in group_copies:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            _local(param.grad).copy_(total)


def _trainable_copies(parts: Sequence[nn.Module], tied: TiedWeights) -> list[list[nn.Parameter]]:
    """Per tied group, this rank's copies that take a gradient, each once."""
    local: dict[str, list[nn.Parameter]] = {}
    for part in parts:
        for name, param in part.named_parameters(remove_duplicate=False):
            local.setdefault(name, []).append(param)
    result = []
    for group in tied.groups:
        # Frozen copies (e.g. the base embedding under PEFT) take no gradient at all.
        copies = {id(p): p for name in group for p in local.get(name, []) if p.requires_grad}
        result.append(list(copies.values()))
    return result


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TiedGradientSync:
    """The tied-gradient sum of this rank's ``parts``: calling it runs :func:`sync_tied_gradients`.

    Collective over the ranks holding copies; on a rank holding none it does nothing.
    """

    def __init__(self, parts: Sequence[nn.Module], tied: TiedWeights):
        self.parts, self.tied = list(parts), tied

    def __call__(self) -> None:
        sync_tied_gradients(self.parts, self.tied)

    def copies(self) -> list[nn.Parameter]:
        """This rank's trainable copies of tied weights."""
        return [p for group in _trainable_copies(self.parts, self.tied) for p in group]


def make_tied_gradient_sync(
    model: nn.Module,
    fqns_per_stage: Sequence[Sequence[str]],
    stage_ids_per_rank: Sequence[Sequence[int]],
    parts: Sequence[nn.Module],
    pp_group: dist.ProcessGroup | None,
    replica_pp_ranks: Sequence[Sequence[int]] | None = None,
) -> TiedGradientSync | None:
    """The once-per-step tied-gradient sum for this rank's ``parts``, or None when nothing is tied across stages.

    Plans the subgroups (collective: call on every rank at setup) and returns
    a no-argument callable to run once per optimizer step, after the last
    backward and before clipping, or to give :func:`sync_tied_grads_in_step`.
    """
    tied = plan_tied_weights(model, fqns_per_stage, stage_ids_per_rank, pp_group, replica_pp_ranks)
    if not tied.groups:
        return None
    return TiedGradientSync(parts, tied)


def sync_tied_grads_in_step(schedule: Any, sync: TiedGradientSync) -> None:
    """Make this ``schedule`` instance's ``step`` end by summing the tied gradient that step added.

    Patches the instance only (its class and other schedules are untouched).
    Each training step first sets the copies' gradients aside: they hold what
    earlier steps added, already summed. The torch step then leaves only its own
    gradient in each copy, ``sync`` sums that across the copies, and the kept
    part is added back. So accumulating over several steps gives the sum of
    every step's share, each counted once, the same as one sum at the end;
    calling ``sync`` again afterwards would add the copies twice, so do not
    (see :func:`detach_tied_gradient_sync` for callers that sum once per
    optimizer step themselves). Costs one more tied-gradient buffer per copy
    while a step runs, from the second accumulation step on. Forward-only
    runs (``schedule.eval``) are passed through untouched.
    """
    if tied_gradient_sync_of(schedule) is not None:
        raise PipelineConfigError("This schedule already sums tied gradients in its step; attach one sync only.")
    original = schedule.step

    @functools.wraps(original)
    def step(*args, **kwargs):
        if not getattr(schedule, "_has_backward", True):
            return original(*args, **kwargs)  # eval(): no gradient to sum, and no collective to run
        kept = _set_aside(sync.copies())
        try:
            result = original(*args, **kwargs)
        except BaseException:
            _add_back(kept, 1)
            raise
        sync()
        _add_back(kept, _schedule_grad_divisor(schedule))
        return result

    schedule.step = step
    setattr(schedule, _SYNC_ATTR, sync)


def tied_gradient_sync_of(schedule: Any) -> TiedGradientSync | None:
    """The sync ``schedule.step`` runs (see :func:`sync_tied_grads_in_step`), or None."""
    return getattr(schedule, _SYNC_ATTR, None)


def detach_tied_gradient_sync(schedule: Any) -> None:
    """Give ``schedule`` back its class's plain ``step``; nothing to do when it sums no tied gradients.

    For a caller that sums tied gradients itself once per optimizer step (PipelineTrainer).
    """
    if tied_gradient_sync_of(schedule) is None:
        return
    del schedule.step  # the instance attribute: the class's method shows through again
    delattr(schedule, _SYNC_ATTR)


def _set_aside(params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    kept = []
    for param in params:
        if param.grad is not None:
            kept.append((param, param.grad))
            param.grad = None
    return kept


def _add_back(kept: Sequence[tuple[nn.Parameter, torch.Tensor]], divisor: int) -> None:
    for param, grad in kept:
        if divisor != 1:
            _local(grad).div_(divisor)
        if param.grad is None:
            param.grad = grad
        else:
            _local(param.grad).add_(_local(grad))


def _schedule_grad_divisor(schedule: Any) -> int:
    """What the torch step divided every parameter's whole gradient by (``scale_grads``).

    The other parameters' earlier gradients went through that division too; the
    kept tied gradients get it alike, so tied weights are no exception.
    """
    return schedule._n_microbatches if getattr(schedule, "scale_grads", False) else 1
