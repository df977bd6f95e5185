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
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "stage_state_dict", "save_pipeline_model", "load_stage_weights", "optimizer_state_by_fqn", "load_optimizer_state_by_fqn",
]

INDEX_NAME = "model.safetensors.index.json"


def stage_state_dict(parts: Iterable[nn.Module], drop: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank's stages, keyed by original FQN.

    ``drop``: names left out, e.g. the second name of a tied weight (the
    loader re-ties it). Buffers present on several stages (rotary tables) are
    written by the stage that lists them first in FQN order: all copies are equal.
    """
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, tensor in part.state_dict().items():
            if name not in drop and name not in state:
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                state[name] = full.detach().contiguous().cpu()
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
    state = stage_state_dict(parts, drop) if write else {}
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
            config.save_pretrained(output_dir)
        if generation_config is not None:
            generation_config.save_pretrained(output_dir)
    dist.barrier(group=pp_group)


def _weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index or the single-file layout."""
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"No {INDEX_NAME} or model.safetensors in {model_dir!r}.")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def load_stage_weights(parts: Iterable[nn.Module], model_dir: str, tied_groups: Sequence[Sequence[str]] = ()) -> None:
    """Copy into this rank's stages their tensors from a Hugging Face model directory.

    Opens only the shards holding this stage's names and reads only those
    tensors. A name absent from the files that belongs to a tied group is read
    under the group's first name (tied weights are saved once).
    """
    files = _weight_files(model_dir)
    alias = {name: group[0] for group in tied_groups for name in group[1:]}
    handles: dict[str, object] = {}
    try:
        for part in parts:
            for name, target in part.state_dict(keep_vars=True).items():
                key = name if name in files else alias.get(name)
                if key not in files:
                    if name in dict(part.named_buffers()) and name not in dict(part.named_parameters()):
                        continue  # non-persistent-style buffers (e.g. rotary tables) are rebuilt, not loaded
                    raise KeyError(f"{name!r} is not in the checkpoint at {model_dir!r}.")
                path = files[key]
                if path not in handles:
                    handles[path] = safe_open(path, "pt")
                with torch.no_grad():
                    target.copy_(handles[path].get_tensor(key))
    finally:
        handles.clear()


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
        "state": {fqns[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state_by_fqn(optimizer: torch.optim.Optimizer, saved: dict, named_parameters) -> None:
    """Load state written by :func:`optimizer_state_by_fqn` into an optimizer over (some of) those FQNs."""
    fqns = _param_fqns(optimizer, named_parameters)
    index = {name: i for i, name in enumerate(fqns)}
    missing = [n for n in fqns if n not in saved["state"]]
    if missing and saved["state"]:
        raise KeyError(f"The optimizer checkpoint has no state for {missing[:3]} (and {max(0, len(missing) - 3)} more).")
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(saved["param_groups"]):
        raise ValueError(f"The checkpoint has {len(saved['param_groups'])} parameter groups, the optimizer {len(groups)}.")
    restored = [{**sg, "params": g["params"]} for sg, g in zip(saved["param_groups"], groups)]
    optimizer.load_state_dict({
        "state": {index[n]: v for n, v in saved["state"].items() if n in index},
        "param_groups": restored,
    })
