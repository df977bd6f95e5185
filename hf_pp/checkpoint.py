"""Writing a pipeline-split model as one ordinary Hugging Face model directory.

Each pipeline rank writes its own stages' tensors to its own safetensors
shard, under the unsplit model's FQNs; rank 0 writes the index, the config
and the generation config. No rank ever holds more than its own stages, and
``AutoModelForCausalLM.from_pretrained(dir)`` loads the result in one process.
The directory must be on a file system every writing rank sees.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from .errors import PipelineConfigError
from .safetensors_reader import CheckpointIndex
from .weight_conversion import original_layout

__all__ = [
    "sharded_like",
    "stage_state_dict", "save_pipeline_model", "load_stage_weights", "optimizer_state_by_fqn", "load_optimizer_state_by_fqn",
    "optimizer_file", "missing_checkpoint_files", "merged_optimizer_state", "staging_dir", "publish_checkpoint",
    "TRAINER_OPTIMIZER", "PIPELINE_OPTIMIZER", "pipeline_optimizer_format", "trainer_optimizer_state_by_fqn",
    "save_optimizer_state", "load_optimizer_state", "plan_optimizer_load", "apply_optimizer_load",
    "unseen_by_some", "writer_of",
]

INDEX_NAME = "model.safetensors.index.json"
_OPTIMIZER_PATTERN = re.compile(r"^optimizer\.pp(\d{3})\.pt$")
_SHARD_COUNT = re.compile(r"^model-\d{5}-of-(\d{5})\.safetensors$")


def stage_state_dict(parts: Iterable[nn.Module], drop: Sequence[str] = (), keep: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank's stages, keyed by original FQN, in the on-disk layout
    ``save_pretrained`` writes (transformers' reverse conversion per stage).

    ``drop``: names left out, e.g. the second name of a tied weight (the
    loader re-ties it). ``keep=False``: gather FSDP shards (a collective) but keep nothing. Buffers present on several stages (rotary tables) are
    written by the stage that lists them first in FQN order: all copies are equal.
    """
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        own: dict[str, torch.Tensor] = {}
        for name, tensor in part.state_dict().items():
            if name not in drop and name not in state:
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if keep:  # a replica that writes nothing takes part in the gathers and holds nothing
                    own[name] = full.detach().contiguous().cpu()
        # Each stage in the layout save_pretrained writes (its own experts split back per expert, ...).
        state.update({k: v.contiguous() for k, v in original_layout(part, own).items()})
    return state


def save_pipeline_model(
    output_dir: str,
    parts: Sequence[nn.Module],
    pp_group: dist.ProcessGroup,
    *,
    config=None,
    generation_config=None,
    drop: Sequence[str] = (),
    write: bool = True,
) -> None:
    """Write the whole pipeline's model to ``output_dir``; every pipeline rank calls it.

    ``write=False`` on data-parallel replicas other than the first: they take
    part in the collective but write nothing.

    Example (on every rank, after training)::

        save_pipeline_model("out/final", parts, pp_group, config=model_config)
        AutoModelForCausalLM.from_pretrained("out/final")   # later, in one process
    """
    pp_rank, pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    # Every replica builds the state: gathering FSDP shards (full_tensor) is a collective over DP.
    state = stage_state_dict(parts, drop, keep=write)
    # Buffers shared by all stages (rotary tables) are kept once, by the lowest rank holding them.
    keys = sorted(state)
    all_keys: list = [None] * pp_size
    dist.all_gather_object(all_keys, keys, group=pp_group)
    owners: dict[str, int] = {}
    for rank, rank_keys in enumerate(all_keys):
        for key in rank_keys:
            owners.setdefault(key, rank)
    shard = f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"
    mine = {k: v for k, v in state.items() if owners[k] == pp_rank}
    if write:
        os.makedirs(output_dir, exist_ok=True)
        save_file(mine, os.path.join(output_dir, shard), metadata={"format": "pt"})
    sizes: list = [None] * pp_size
    dist.all_gather_object(sizes, sum(t.numel() * t.element_size() for t in mine.values()), group=pp_group)
    if write and pp_rank == 0:
        weight_map = {key: f"model-{rank + 1:05d}-of-{pp_size:05d}.safetensors" for key, rank in sorted(owners.items())}
        with open(os.path.join(output_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
        if config is not None:
            if hasattr(parts[0], "config"):
                # As save_pretrained does: the class goes into the config, so an Auto class rebuilds the same head.
                config.architectures = [type(parts[0]).__name__]
            if hasattr(parts[0], "dtype"):  # as save_pretrained writes it ("float32", "bfloat16", ...)
                config.dtype = str(parts[0].dtype).split(".")[1]
            config.save_pretrained(output_dir)
        if generation_config is not None:
            generation_config.save_pretrained(output_dir)
    dist.barrier(group=pp_group)


def load_stage_weights(parts: Iterable[nn.Module], model_dir: str, tied_groups: Sequence[Sequence[str]] = ()) -> None:
    """Copy into this rank's stages their tensors from a Hugging Face model directory.

    Reads only the shards holding this stage's tensors, through transformers' conversion rules (a
    checkpoint in the original layout, e.g. per-expert tensors, fills the fused parameters). A name absent
    from the files that belongs to a tied group is read under the group's first name (tied weights are
    saved once). A missing name or a tensor of another shape (a checkpoint of another model) raises
    :class:`PipelineConfigError`.

    Example::

        load_stage_weights(parts, "out/checkpoint-4", tied_groups=[["model.embed_tokens.weight", "lm_head.weight"]])
    """
    from .materialize import stage_checkpoint

    index = CheckpointIndex(model_dir)
    alias = {name: group[0] for group in tied_groups for name in group[1:]}
    for part in parts:
        source = stage_checkpoint(index, part)
        params = dict(part.named_parameters())
        staged: dict[str, torch.Tensor] = {}
        sharded: list[tuple[str, torch.Tensor]] = []
        for name, target in part.state_dict(keep_vars=True).items():
            key = name if name in source else alias.get(name)
            if key not in source:
                if name not in params:
                    continue  # buffers such as rotary tables are rebuilt from the config, not loaded
                raise PipelineConfigError(
                    f"{name!r} is not in the checkpoint at {model_dir!r}: it was written for another model "
                    "(or another PEFT setup); resume from a checkpoint of this model."
                )
            if hasattr(target, "device_mesh"):  # an FSDP shard: read below, one whole tensor at a time
                sharded.append((key, target))
            else:
                staged[key] = target.detach()
        source.read_into(staged)
        for key, target in sharded:
            whole = torch.empty(target.shape, dtype=target.dtype)
            source.read_into({key: whole})
            with torch.no_grad():
                target.copy_(sharded_like(whole, target))
            del whole  # never more than one unsharded tensor of the stage at once


def optimizer_file(pp_rank: int) -> str:
    """Name of the optimizer state file of one pipeline rank.

    Example:
        >>> optimizer_file(1)
        'optimizer.pp001.pt'
    """
    return f"optimizer.pp{pp_rank:03d}.pt"


def missing_checkpoint_files(checkpoint_dir: str, *, weights: bool = True, optimizer: bool = True) -> list[str]:
    """Files a complete pipeline checkpoint must hold but ``checkpoint_dir`` lacks (empty when complete).

    Reads only file names and the index, so every rank can run it and all agree.
    """
    if not os.path.isdir(checkpoint_dir):
        return [checkpoint_dir]
    missing = []
    if weights:
        index = os.path.join(checkpoint_dir, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing += [s for s in shards if not os.path.isfile(os.path.join(checkpoint_dir, s))]
        elif not os.path.isfile(os.path.join(checkpoint_dir, "model.safetensors")):
            missing.append(INDEX_NAME)
    if optimizer:
        names = os.listdir(checkpoint_dir)
        if "scheduler.pt" not in names:
            missing.append("scheduler.pt")
        if pipeline_optimizer_format(checkpoint_dir) == "dcp":
            # Its .metadata is written once every rank's state is; it names each rank's files.
            return missing + _missing_dcp_files(os.path.join(checkpoint_dir, PIPELINE_OPTIMIZER))
        if pipeline_optimizer_format(checkpoint_dir) is None:
            return missing + [os.path.join(PIPELINE_OPTIMIZER, ".metadata")]
        ranks = sorted(int(m.group(1)) for m in map(_OPTIMIZER_PATTERN.match, names) if m)
        # One state file per pipeline rank: as many as the weight shards say ("-of-0000N") wrote them.
        writers = max([int(m.group(1)) for m in map(_SHARD_COUNT.search, names) if m] + [max(ranks, default=0) + 1])
        missing += [optimizer_file(r) for r in range(writers) if r not in ranks]
    return missing


def _missing_dcp_files(directory: str) -> list[str]:
    """The files a ``torch.distributed.checkpoint`` directory's metadata names but the directory lacks."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(directory).read_metadata()
    except (EOFError, pickle.UnpicklingError, AttributeError):
        return []  # present but unreadable: the load itself names it; only absent files are listed here
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    return [os.path.join(PIPELINE_OPTIMIZER, f) for f in files if not os.path.isfile(os.path.join(directory, f))]


_DCP_FILE = re.compile(r"__(\d+)_\d+\.distcp$")
_WEIGHT_SHARD = re.compile(r"model-(\d{5})-of-\d{5}\.safetensors$")


def writer_of(name: str) -> str | None:
    """Which rank writes this checkpoint file (for messages), or None for a file written once.

    Example:
        >>> writer_of("pipeline_optimizer/__3_0.distcp"), writer_of("model-00002-of-00004.safetensors")
        ('rank 3', 'pipeline rank 1')
        >>> writer_of("optimizer.pp001.pt"), writer_of("scheduler.pt")
        ('pipeline rank 1', None)
    """
    base = os.path.basename(name)
    for pattern, who, offset in ((_DCP_FILE, "rank", 0), (_WEIGHT_SHARD, "pipeline rank", 1),
                                 (_OPTIMIZER_PATTERN, "pipeline rank", 0)):
        match = pattern.search(base)
        if match:
            return f"{who} {int(match.group(1)) - offset}"
    return None


def unseen_by_some(views: Sequence[Sequence[str]]) -> dict[int, list[str]]:
    """Per rank, the checkpoint files it lacks that another rank sees (empty when every rank sees the same).

    ``views[r]`` is what rank r found missing; a rank that cannot see the directory at all lacks everything the
    others see.

    Example:
        >>> unseen_by_some([[], ["ckpt"], []])
        {1: ['ckpt']}
        >>> unseen_by_some([["scheduler.pt"], ["scheduler.pt"]])
        {}
    """
    everywhere = set.intersection(*map(set, views)) if views else set()
    return {rank: sorted(set(view) - everywhere) for rank, view in enumerate(views) if set(view) - everywhere}


def merged_optimizer_state(checkpoint_dir: str, map_location=None) -> dict:
    """The FQN-keyed optimizer state of every pipeline rank of a checkpoint written by hf_pp 0.1
    (``optimizer.ppNNN.pt`` files), as one dict.

    Memory-mapped: a rank that takes only its parameters' state reads only those pages.
    """
    names = sorted(n for n in os.listdir(checkpoint_dir) if _OPTIMIZER_PATTERN.match(n))
    merged: dict = {"state": {}, "param_groups": None}
    for name in names:
        saved = torch.load(os.path.join(checkpoint_dir, name), map_location=map_location, weights_only=True, mmap=True)
        merged["state"].update(saved["state"])
        if merged["param_groups"] is None:
            merged["param_groups"] = [dict(g) for g in saved["param_groups"]]
        else:
            for group, other in zip(merged["param_groups"], saved["param_groups"]):
                group["params"] = list(group["params"]) + list(other["params"])
    return merged


TRAINER_OPTIMIZER = "optimizer.pt"  # what Trainer writes on one process (or DDP): indices, not names
PIPELINE_OPTIMIZER = "pipeline_optimizer"  # torch.distributed.checkpoint directory: state by FQN, shards as shards


def save_optimizer_state(optimizer: torch.optim.Optimizer, named_parameters, directory: str,
                         process_group=None) -> None:
    """Write the optimizer state of every rank's parameters, by FQN, with ``torch.distributed.checkpoint``.

    A collective over ``process_group`` (default: the world). Each rank writes its own parameters' state;
    an FSDP shard is written as a shard (never gathered) and a state held whole by several data-parallel
    replicas is written once. Any later layout reads back just what it holds (:func:`load_optimizer_state`).
    """
    import torch.distributed.checkpoint as dcp

    fqns = _param_fqns(optimizer, named_parameters)
    saved = optimizer.state_dict()
    dcp.save({
        "state": {fqns[i]: dict(value) for i, value in saved["state"].items()},
        # The same on every rank (hyperparameters); which parameter is in which group follows from the model.
        "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]],
    }, checkpoint_id=directory, process_group=process_group)


def _state_template(metadata, params: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Tensors to load this rank's parameters' state into, shaped from the checkpoint's metadata;
    and the FQNs the checkpoint has no state for."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    template: dict[str, dict] = {}
    for flat, path in (metadata.planner_data or {}).items():
        if len(path) != 3 or path[0] != "state" or path[1] not in params:
            continue
        entry, param = metadata.state_dict_metadata[flat], params[path[1]]
        if not isinstance(entry, TensorStorageMetadata):
            template.setdefault(path[1], {})[path[2]] = None  # a Python value, read as saved
        elif hasattr(param, "device_mesh") and tuple(entry.size) == tuple(param.shape):
            from torch.distributed.tensor import empty as dtensor_empty

            # This rank's shard only, laid out as its parameter: DCP reads just that slice.
            template.setdefault(path[1], {})[path[2]] = dtensor_empty(
                tuple(entry.size), dtype=entry.properties.dtype, device_mesh=param.device_mesh,
                placements=param.placements)
        else:
            template.setdefault(path[1], {})[path[2]] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    return template, [name for name in params if name not in template]


def plan_optimizer_load(optimizer: torch.optim.Optimizer, named_parameters, directory: str) -> dict:
    """What :func:`apply_optimizer_load` will read for this rank: pure (no collective), so every rank can
    check it and agree before the collective read. Raises when the checkpoint lacks a parameter's state."""
    from torch.distributed.checkpoint import FileSystemReader

    named_parameters = list(named_parameters)
    fqns = _param_fqns(optimizer, named_parameters)
    params = dict(named_parameters)
    metadata = FileSystemReader(directory).read_metadata()
    template, missing = _state_template(metadata, {n: params[n] for n in fqns})
    has_state = any(path[0] == "state" for path in (metadata.planner_data or {}).values())
    if missing and has_state:
        raise PipelineConfigError(
            f"The optimizer checkpoint {directory!r} has no state for {missing[:3]} (and {max(0, len(missing) - 3)} "
            "more): it was written for another model or another set of trainable parameters."
        )
    groups = optimizer.state_dict()["param_groups"]
    return {"fqns": fqns, "groups": groups,
            "request": {"state": template, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups]}}


def apply_optimizer_load(optimizer: torch.optim.Optimizer, plan: dict, directory: str, process_group=None) -> None:
    """Read the planned state (a collective over ``process_group``, default the world) into ``optimizer``."""
    import torch.distributed.checkpoint as dcp

    request, groups = plan["request"], plan["groups"]
    dcp.load(request, checkpoint_id=directory, process_group=process_group)
    if len(request["param_groups"]) != len(groups):
        raise PipelineConfigError(
            f"The checkpoint has {len(request['param_groups'])} optimizer parameter groups, this optimizer "
            f"{len(groups)}: resume with the optimizer settings (optim, weight_decay) it was trained with."
        )
    index = {name: i for i, name in enumerate(plan["fqns"])}
    optimizer.load_state_dict({
        "state": {index[name]: state for name, state in request["state"].items()},
        "param_groups": [{**saved, "params": g["params"]} for saved, g in zip(request["param_groups"], groups)],
    })


def load_optimizer_state(optimizer: torch.optim.Optimizer, named_parameters, directory: str,
                         process_group=None) -> None:
    """Load into ``optimizer`` the state :func:`save_optimizer_state` wrote, for the parameters it holds.

    Reads only those parameters' state (an FSDP parameter: its shard), under any pipeline layout, schedule
    or data-parallel size; on one process (no process group) the same way. Every rank of
    ``process_group`` must call it.
    """
    apply_optimizer_load(optimizer, plan_optimizer_load(optimizer, named_parameters, directory), directory,
                         process_group)


def pipeline_optimizer_format(checkpoint_dir: str) -> str | None:
    """How a pipelined checkpoint holds its optimizer state: ``"dcp"`` (a ``torch.distributed.checkpoint``
    directory, this version), ``"per-rank-files"`` (``optimizer.ppNNN.pt``, hf_pp 0.1) or None (neither)."""
    if os.path.isfile(os.path.join(checkpoint_dir, PIPELINE_OPTIMIZER, ".metadata")):
        return "dcp"
    if os.path.isdir(checkpoint_dir) and any(map(_OPTIMIZER_PATTERN.match, os.listdir(checkpoint_dir))):
        return "per-rank-files"
    return None


def trainer_optimizer_state_by_fqn(checkpoint_dir: str, fqn_order: Sequence[str]) -> dict:
    """Trainer's ``optimizer.pt`` keyed by FQN, as :func:`optimizer_state_by_fqn` writes it.

    ``fqn_order`` names Trainer's optimizer parameters in its own index order (its parameter groups in
    turn). Memory-mapped: a rank reads the pages of its own parameters' state only.
    """
    saved = torch.load(os.path.join(checkpoint_dir, TRAINER_OPTIMIZER), map_location="cpu", weights_only=True, mmap=True)
    count = sum(len(g["params"]) for g in saved["param_groups"])
    if count != len(fqn_order):
        raise PipelineConfigError(
            f"{checkpoint_dir!r}/{TRAINER_OPTIMIZER} holds {count} parameters' state but this model trains "
            f"{len(fqn_order)}: it was written for another model or another set of trainable parameters."
        )
    return {
        "state": {fqn_order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [fqn_order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def staging_dir(final_dir: str) -> str:
    """Where a checkpoint is written before it is published under ``final_dir``.

    The name matches neither ``checkpoint-*`` nor Trainer's last-checkpoint
    pattern, so a half-written checkpoint is never resumed from or rotated.

    Example:
        >>> staging_dir("out/checkpoint-8")
        'out/.tmp-checkpoint-8'
    """
    head, tail = os.path.split(os.path.normpath(final_dir))
    return os.path.join(head, f".tmp-{tail}")


def publish_checkpoint(staged: str, final_dir: str) -> None:
    """Make a fully written staging directory the checkpoint ``final_dir`` (one rank calls it).

    An older directory of the same name is moved aside first and deleted
    after the rename, so ``final_dir`` is always either the old or the new
    complete checkpoint.
    """
    old = None
    if os.path.exists(final_dir):
        old = staging_dir(final_dir) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(staged, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _full(value):
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def sharded_like(value, param: torch.Tensor):
    """A whole saved state tensor, sharded like ``param`` when ``param`` is a DTensor (FSDP)."""
    if not hasattr(param, "device_mesh") or not torch.is_tensor(value) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    # Every rank holds the whole tensor: take the local shard without communicating.
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _param_fqns(optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    """FQN of every optimizer parameter, in the optimizer's own index order."""
    names = {id(p): n for n, p in named_parameters}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_fqn(optimizer: torch.optim.Optimizer, named_parameters) -> dict:
    """``optimizer.state_dict()`` with parameter indices replaced by FQNs.

    A checkpoint keyed this way can be read without knowing how the model
    was split: any layout that holds a parameter finds its state by name.
    """
    fqns = _param_fqns(optimizer, named_parameters)
    state = optimizer.state_dict()
    return {
        # FSDP state is sharded like its parameter: store it whole (a collective over the shard group).
        "state": {fqns[i]: {k: _full(v) for k, v in value.items()} for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state_by_fqn(optimizer: torch.optim.Optimizer, saved: dict, named_parameters) -> None:
    """Load state written by :func:`optimizer_state_by_fqn` into an optimizer over (some of) those FQNs."""
    named_parameters = list(named_parameters)
    fqns = _param_fqns(optimizer, named_parameters)
    index = {name: i for i, name in enumerate(fqns)}
    missing = [n for n in fqns if n not in saved["state"]]
    if missing and saved["state"]:
        raise PipelineConfigError(
            f"The optimizer checkpoint has no state for {missing[:3]} (and {max(0, len(missing) - 3)} more): it was "
            "written for another model or another set of trainable parameters."
        )
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(saved["param_groups"]):
        raise PipelineConfigError(
            f"The checkpoint has {len(saved['param_groups'])} optimizer parameter groups, this optimizer {len(groups)}: "
            "resume with the optimizer settings (optim, weight_decay) the checkpoint was trained with."
        )
    restored = [{**sg, "params": g["params"]} for sg, g in zip(saved["param_groups"], groups)]
    params = dict(named_parameters)
    optimizer.load_state_dict({
        "state": {index[n]: {k: sharded_like(v, params[n]) for k, v in state.items()}
                  for n, state in saved["state"].items() if n in index},
        "param_groups": restored,
    })
