"""PEFT adapters spread across pipeline stages.

The pipeline splits the Hugging Face model inside the ``PeftModel``
(``peft_model.get_base_model()``), whose layers already carry the adapter
modules; each adapter therefore lives on the stage of the layer it adapts,
under the unsplit FQN (``model.layers.3.self_attn.q_proj.lora_A.default.weight``).
To export, each pipeline rank turns its stage's tensors into PEFT's adapter
keys, the small adapter tensors are gathered on pipeline rank 0, and it
writes a normal adapter directory that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import sharded_like

__all__ = ["is_peft_model", "unwrap_peft", "trainable_state", "save_pipeline_adapter", "load_pipeline_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the check cheap and safe
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model the pipeline splits: the PeftModel's base model, or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def _peft_prefix(peft_model: nn.Module) -> str:
    """How the base model's FQNs are spelled inside the PeftModel (``base_model.model.``)."""
    base = peft_model.get_base_model()
    for name, module in peft_model.named_modules():
        if module is base:
            return f"{name}." if name else ""
    raise ValueError("The PeftModel does not contain its own base model.")


def trainable_state(peft_model: nn.Module, parts: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's trainable tensors (the adapter's share on its stages), under PeftModel FQNs."""
    prefix = _peft_prefix(peft_model)
    return {
        prefix + n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for part in parts for n, p in part.named_parameters() if p.requires_grad
    }


def save_pipeline_adapter(
    output_dir: str, peft_model: nn.Module, parts: Sequence[nn.Module], pp_group: dist.ProcessGroup, *, write: bool = True
) -> None:
    """Write every stage's adapter weights as one PEFT adapter directory; every pipeline rank calls it.

    The trainable tensors (small) are gathered on pipeline rank 0, which lets
    PEFT pick and name the adapter's entries exactly as ``save_pretrained``
    would (PEFT's wrappers expect to see all of their own tensors at once).

    Example (every rank)::

        save_pipeline_adapter("out/adapter", peft_model, parts, pp_group)
        PeftModel.from_pretrained(base_model, "out/adapter")   # later, one process
    """
    from peft import get_peft_model_state_dict

    shares: list = [None] * dist.get_world_size(pp_group)
    state = trainable_state(peft_model, parts)  # on every replica: gathering FSDP shards is a DP collective
    dist.all_gather_object(shares, state if write else {}, group=pp_group)
    if write and dist.get_rank(pp_group) == 0:
        merged = {k: v for share in shares for k, v in share.items()}
        adapter = get_peft_model_state_dict(peft_model, state_dict=merged, save_embedding_layers=False)
        os.makedirs(output_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(output_dir, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(output_dir)
    dist.barrier(group=pp_group)


def load_pipeline_adapter(peft_model: nn.Module, parts: Sequence[nn.Module], adapter_dir: str) -> None:
    """Copy an adapter directory's weights into this rank's stages (only the keys they hold)."""
    from peft import get_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    prefix = _peft_prefix(peft_model)
    saved = load_peft_weights(adapter_dir, device="cpu")
    for part in parts:
        for name, param in part.named_parameters():
            # Ask PEFT how it spells this parameter in a saved adapter (if it is part of one).
            spelled = get_peft_model_state_dict(peft_model, state_dict={prefix + name: param}, save_embedding_layers=False)
            for key in spelled:
                if key not in saved:
                    raise KeyError(f"Adapter tensor {key!r} is missing from {adapter_dir!r}.")
                with torch.no_grad():
                    param.copy_(sharded_like(saved[key], param))
