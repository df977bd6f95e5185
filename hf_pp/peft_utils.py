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
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import sharded_like
from .errors import PipelineConfigError

__all__ = [
    "is_peft_model", "unwrap_peft", "trainable_state", "save_pipeline_adapter", "load_pipeline_adapter",
    "adapter_parameter_names", "check_peft_config_can_initialize", "check_adapters_can_initialize", "make_adapter_initializer",
]

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


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """FQNs of the adapter weights PEFT added to ``model`` (``...q_proj.lora_A.default.weight``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.Module):
                prefix = f"{module_name}.{attr}." if module_name else f"{attr}."
                names.update(prefix + n for n, _ in holder.named_parameters())
    return names


# LoRA initialisations that need nothing but the adapter's own shapes (the others read the base weights).
_SELF_CONTAINED_LORA_INITS = (True, False, "gaussian")


_META_HINT = "use plain LoRA (init_lora_weights=True or 'gaussian'), or build the model whole (not on the meta device)."


def check_peft_config_can_initialize(config: Any) -> None:
    """Refuse, before ``get_peft_model`` runs on a meta-device model, adapters it cannot initialise there.

    Example:
        >>> from peft import LoraConfig
        >>> check_peft_config_can_initialize(LoraConfig(r=8))
    """
    kind = str(getattr(config, "peft_type", ""))
    if not kind.endswith("LORA"):
        raise PipelineConfigError(f"A {kind or type(config).__name__} adapter cannot be initialised per stage; {_META_HINT}")
    if getattr(config, "use_dora", False):
        raise PipelineConfigError(f"DoRA computes its magnitude from the base weights; {_META_HINT}")
    if config.init_lora_weights not in _SELF_CONTAINED_LORA_INITS:
        raise PipelineConfigError(f"init_lora_weights={config.init_lora_weights!r} computes adapters from the base weights; {_META_HINT}")


def check_adapters_can_initialize(model: nn.Module, peft_configs: dict[str, Any] | None = None) -> None:
    """Refuse adapters that a meta-device stage cannot initialise on its own (run it before the split).

    Allowed: LoRA with ``init_lora_weights`` True, False or ``"gaussian"``.
    Refused: other adapter types, DoRA and LoRA initialisations that read the
    base weights (PiSSA, OLoRA, LoftQ, ...), all of which need the weights
    before per-stage loading has read them.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    hint = _META_HINT
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in set(module.lora_A) | set(module.lora_embedding_A):
                if module.use_dora.get(adapter):
                    raise PipelineConfigError(f"{name}: DoRA computes its magnitude from the base weights; {hint}")
                how = peft_configs[adapter].init_lora_weights if peft_configs else True
                if how not in _SELF_CONTAINED_LORA_INITS:
                    raise PipelineConfigError(f"{name}: init_lora_weights={how!r} computes adapters from the base weights; {hint}")
        elif isinstance(module, BaseTunerLayer):
            raise PipelineConfigError(f"{name} is a {type(module).__name__} adapter; per-stage loading initialises LoRA only: {hint}")


def make_adapter_initializer(peft_configs: dict[str, Any] | None = None) -> Callable[[nn.Module], None]:
    """Initialise, in place, the LoRA adapters of a freshly materialised stage as PEFT would.

    ``peft_configs`` is ``PeftModel.peft_config`` (adapter name -> config);
    without it LoRA's default initialisation (A Kaiming-uniform, B zero) is
    used. See :func:`check_adapters_can_initialize` for what is supported.
    """
    from peft.tuners.lora import LoraLayer

    def initialize(part: nn.Module) -> None:
        check_adapters_can_initialize(part, peft_configs)
        for module in part.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in set(module.lora_A) | set(module.lora_embedding_A):
                how = peft_configs[adapter].init_lora_weights if peft_configs else True
                if how is False:  # PEFT then keeps torch's default init of the adapter layers
                    for layer in (module.lora_A.get(adapter), module.lora_B.get(adapter)):
                        if layer is not None:
                            layer.reset_parameters()
                else:
                    module.reset_lora_parameters(adapter, how)
        for name in adapter_parameter_names(part):
            part.get_parameter(name)._is_hf_initialized = True  # keep transformers' init off them

    return initialize
