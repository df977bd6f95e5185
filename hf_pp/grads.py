"""Gradient tools over a whole pipeline: scaling and norm clipping.

A rank holds only its stages, so a norm computed locally is wrong. The total
norm here sums the p-th powers of every local gradient (max for the inf
norm), then reduces across the pipeline group, and across the shard group of
DTensor (FSDP2) gradients, so every rank returns the same value that
``torch.nn.utils.clip_grad_norm_`` gives on the unsplit model.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from .errors import PipelineConfigError

__all__ = ["scale_grads_by_divisor", "total_grad_norm", "clip_grad_norm", "tied_copies_to_skip"]


def _parts(parts: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [parts] if isinstance(parts, nn.Module) else list(parts)


def tied_copies_to_skip(tied_groups: Sequence[Sequence[str]] | None) -> set[str]:
    """FQNs left out of a norm: every name of a tied group but its first.

    Each stage copy keeps its original FQN, so a tied embedding appears as
    ``model.embed_tokens.weight`` on the first stage and ``lm_head.weight`` on
    the last. Once their gradients are summed (see :mod:`hf_pp.tied`) both
    copies hold the same gradient; the unsplit model counts it once.

    Example:
        >>> sorted(tied_copies_to_skip([["model.embed_tokens.weight", "lm_head.weight"]]))
        ['lm_head.weight']
    """
    return {name for group in tied_groups or () for name in list(group)[1:]}


def scale_grads_by_divisor(parts: nn.Module | Iterable[nn.Module], divisor: float) -> None:
    """Divide every gradient of this rank's stages by ``divisor`` in place.

    Use it when the loss was summed over microbatches (``scale_grads=False``)
    and should become a mean. Each rank scales its own stages; no collective.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> lin(torch.ones(1, 2)).sum().backward()
        >>> scale_grads_by_divisor([lin], 4)
        >>> lin.bias.grad
        tensor([0.2500])
    """
    if not isinstance(divisor, (int, float)) or isinstance(divisor, bool) or not divisor > 0 or math.isinf(divisor):
        raise PipelineConfigError(f"scale_grads_by_divisor needs a positive, finite divisor, got {divisor!r}.")
    with torch.no_grad():
        for grad in _local_grads(parts):
            grad.div_(divisor)


def _local(grad: torch.Tensor) -> torch.Tensor:
    # In-place arithmetic on the local shard avoids DTensor dispatch (and its
    # refusal to mix DTensor and plain-tensor operands).
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _local_grads(parts: nn.Module | Iterable[nn.Module]) -> Iterable[torch.Tensor]:
    """Each distinct parameter's gradient once (as its local shard), for in-place scaling."""
    seen: set[int] = set()
    for part in _parts(parts):
        for p in part.parameters():
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                yield _local(p.grad)


def _shard_groups(grad: DTensor) -> tuple[dist.ProcessGroup, ...]:
    """The process groups across which this DTensor's elements are spread (Shard dims)."""
    mesh = grad.device_mesh
    return tuple(mesh.get_group(dim) for dim, pl in enumerate(grad.placements) if isinstance(pl, Shard))


def total_grad_norm(
    parts: nn.Module | Iterable[nn.Module],
    norm_type: float = 2.0,
    *,
    pp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    tied_groups: Sequence[Sequence[str]] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The norm of all gradients of the whole pipeline, identical on every rank.

    ``pp_group``: the pipeline group whose ranks hold the other stages (None: this
    process only). ``dp_group``: give it only when plain-tensor gradients are
    disjoint shards across DP ranks; replicated gradients (DDP, or averaged by
    hand) must not pass it, or they would be counted ``dp_size`` times. DTensor
    (FSDP2) gradients are reduced over their own shard groups automatically.
    ``tied_groups`` (from :func:`hf_pp.split.tied_parameter_groups` on the
    unsplit model): the copies of a tied weight are counted once. ``device``:
    where the norm is computed and reduced; by default the device of the first
    gradient, else of the stages' first parameter or buffer, so a rank with no
    gradient at all (a frozen stage) still reduces on the stage's device, as
    NCCL requires.

    Example:
        >>> lin = nn.Linear(3, 1, bias=False)
        >>> lin.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
        >>> total_grad_norm([lin]), total_grad_norm([lin], float("inf"))
        (tensor(5.), tensor(4.))
    """
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise PipelineConfigError(f"norm_type must be positive or inf, got {norm_type}.")
    is_inf = math.isinf(norm_type)
    skip = tied_copies_to_skip(tied_groups)
    # One accumulator per set of groups to reduce over, so each group sees one collective.
    acc: dict[tuple, torch.Tensor] = {}
    device = torch.device(device) if device is not None else None
    seen: set[int] = set()
    for part in _parts(parts):
        for name, p in part.named_parameters():
            if p.grad is None or name in skip or id(p) in seen:
                continue
            seen.add(id(p))
            grad = p.grad.detach()
            groups: tuple = ()
            if isinstance(grad, DTensor):
                groups = _shard_groups(grad)
                grad = grad.to_local()
            elif dp_group is not None:
                groups = (dp_group,)
            device = grad.device if device is None else device
            if grad.numel() == 0:
                continue
            g = grad.float()
            value = g.abs().max() if is_inf else torch.linalg.vector_norm(g, norm_type) ** norm_type
            value = value.to(device)
            if groups in acc:
                acc[groups] = torch.maximum(acc[groups], value) if is_inf else acc[groups] + value
            else:
                acc[groups] = value
    if device is None:
        device = _stage_device(parts)
    op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
    total = torch.zeros((), dtype=torch.float32, device=device)
    for groups, value in acc.items():
        for group in groups:
            dist.all_reduce(value, op=op, group=group)
        total = torch.maximum(total, value) if is_inf else total + value
    if pp_group is not None:
        dist.all_reduce(total, op=op, group=pp_group)
    return total if is_inf else total ** (1.0 / norm_type)


def _stage_device(parts: nn.Module | Iterable[nn.Module]) -> torch.device:
    """The device of the stages' first parameter or buffer (the CPU for stages holding no tensor)."""
    for part in _parts(parts):
        for tensor in itertools.chain(part.parameters(), part.buffers()):
            return _local(tensor).device
    return torch.device("cpu")


def clip_grad_norm(
    parts: nn.Module | Iterable[nn.Module],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    pp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    tied_groups: Sequence[Sequence[str]] | None = None,
    error_if_nonfinite: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Clip the gradients of all pipeline stages to a total norm of ``max_norm``.

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` on the unsplit model
    (coefficient ``max_norm / (total + 1e-6)``, capped at 1), with the total
    from :func:`total_grad_norm`. Every rank of ``pp_group`` must call it
    (it runs collectives) and gets the same total norm back, which it returns
    unclipped, like torch. Call it after tied gradients were summed.
    ``device``: see :func:`total_grad_norm`.

    Example:
        >>> lin = nn.Linear(3, 1, bias=False)
        >>> lin.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
        >>> clip_grad_norm([lin], max_norm=1.0)
        tensor(5.)
        >>> lin.weight.grad
        tensor([[0.6000, 0.0000, 0.8000]])
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise PipelineConfigError(f"clip_grad_norm needs max_norm > 0, got {max_norm!r}; use e.g. max_norm=1.0.")
    total = total_grad_norm(parts, norm_type, pp_group=pp_group, dp_group=dp_group, tied_groups=tied_groups,
                            device=device)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} of the pipeline's gradients is non-finite ({total.item()}); "
            "pass error_if_nonfinite=False to clip anyway."
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for grad in _local_grads(parts):
            grad.mul_(coef.to(device=grad.device, dtype=grad.dtype))
    return total
