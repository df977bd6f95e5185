"""Device meshes for pipeline (x data) parallelism, built from the world size, and this process's device."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .errors import PipelineConfigError

__all__ = ["validate_pp_size", "build_world_mesh", "pp_axis", "default_device"]


def validate_pp_size(pp_size: int, world_size: int) -> int:
    """Return the data-parallel size, or raise when ``pp_size`` cannot split the world."""
    if pp_size < 1:
        raise PipelineConfigError(f"pp_size must be at least 1, got {pp_size}.")
    if world_size % pp_size != 0:
        raise PipelineConfigError(
            f"The world size ({world_size} processes) is not divisible by pp_size={pp_size}. Launch a multiple "
            f"of {pp_size} processes (e.g. torchrun --nproc-per-node {pp_size}) or change pp_size."
        )
    return world_size // pp_size


def build_world_mesh(pp_size: int, device_type: str = "cpu", world_size: int | None = None) -> DeviceMesh:
    """A 2-D ``("pp", "dp")`` mesh; rank = pp_rank * dp_size + dp_rank.

    Ranks of one data-parallel group are neighbours (usually the same host),
    and each pipeline spans ``pp_size`` ranks ``dp_size`` apart.

    Example (under ``torchrun --nproc-per-node 4``)::

        mesh = build_world_mesh(pp_size=2)   # pp=2 x dp=2
        mesh["pp"].get_local_rank()
    """
    world_size = dist.get_world_size() if world_size is None else world_size
    dp_size = validate_pp_size(pp_size, world_size)
    return init_device_mesh(device_type, (pp_size, dp_size), mesh_dim_names=("pp", "dp"))


def pp_axis(world_mesh: DeviceMesh, pp_axis_name: str) -> DeviceMesh:
    """The 1-D pipeline sub-mesh, with a clear error when the axis is missing."""
    names = world_mesh.mesh_dim_names or ()
    if pp_axis_name not in names:
        raise PipelineConfigError(
            f"The device mesh has no axis named {pp_axis_name!r}; its axes are {tuple(names)}. "
            "Build it with mesh_dim_names including the pipeline axis, e.g. ('pp', 'dp')."
        )
    return world_mesh[pp_axis_name]


def default_device() -> torch.device:
    """The device of this process when the caller names none: ``cuda:{LOCAL_RANK}``, the current GPU, or the CPU.

    ``torch.cuda.current_device()`` is GPU 0 in every process until someone
    calls ``torch.cuda.set_device``, so on a multi-GPU node all local ranks
    would share GPU 0; ``LOCAL_RANK`` (set by torchrun and accelerate) gives
    each its own. A process that sees a single GPU (a launcher that sets
    ``CUDA_VISIBLE_DEVICES`` per rank) uses that one. Without ``LOCAL_RANK``:
    the current GPU; without CUDA: the CPU.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    try:
        index = int(local_rank)
    except ValueError:
        index = -1
    if index < 0:
        raise PipelineConfigError(
            f"LOCAL_RANK={local_rank!r} is not a local rank (0, 1, ...); pass device explicitly, e.g. device='cuda:0'."
        )
    if count == 1:
        return torch.device("cuda", 0)
    if index >= count:
        raise PipelineConfigError(
            f"LOCAL_RANK={index} but this process sees {count} GPUs (cuda:0 to cuda:{count - 1}); launch at most "
            f"{count} processes per node or pass device explicitly, e.g. device='cuda:{index % count}'."
        )
    return torch.device("cuda", index)
