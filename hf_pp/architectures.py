"""What hf_pp knows about Hugging Face architectures: layer counts and the
module FQNs of each stage, read from the model's own pipeline plan."""

from __future__ import annotations

import torch.nn as nn

from .errors import PipelineConfigError
from .stage_math import split_layers_evenly

__all__ = ["num_decoder_layers", "module_fqns_per_stage"]


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise PipelineConfigError(
            f"{type(model).__name__} is not a Hugging Face model: pass module_fqns_per_model_part "
            "(one list of module FQNs per stage) to split it."
        )
    return config


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers of a Hugging Face causal LM."""
    config = _config(model)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if layers is None:
        raise PipelineConfigError(
            f"Cannot tell how many layers {type(model).__name__} has (no num_hidden_layers in its config); "
            "pass module_fqns_per_model_part."
        )
    return layers


def module_fqns_per_stage(model: nn.Module, num_stages: int) -> list[list[str]]:
    """Stage FQN lists from ``config.base_model_pp_plan`` and the CausalLM ``_pp_plan``."""
    config = _config(model)
    plan = getattr(config, "base_model_pp_plan", None)
    if not plan:
        raise PipelineConfigError(
            f"{type(model).__name__} has no base_model_pp_plan in its config; pass module_fqns_per_model_part."
        )
    base = getattr(model, "base_model_prefix", "model")
    prefix = f"{base}." if getattr(model, base, None) is not None and getattr(model, base) is not model else ""
    modules = dict(model.named_modules())
    layer_container = next(name for name in plan if isinstance(modules.get(prefix + name), nn.ModuleList))
    names = list(plan)
    before = [prefix + n for n in names[: names.index(layer_container)]]
    after = [prefix + n for n in names[names.index(layer_container) + 1 :]]
    # The CausalLM plan repeats the base model's entries under the prefix; keep the head only.
    head = [n for n in getattr(model, "_pp_plan", None) or {} if not (prefix and n.startswith(prefix))]
    helpers = [
        name for name, child in (getattr(model, base, model) if prefix else model).named_children()
        if prefix + name not in before + after and name != layer_container and not any(True for _ in child.parameters())
    ]
    parts = []
    for stage, layers in enumerate(split_layers_evenly(num_decoder_layers(model), num_stages)):
        fqns = list(before) if stage == 0 else []
        fqns += [f"{prefix}{layer_container}.{i}" for i in layers]
        if stage == num_stages - 1:
            fqns += after + head
        fqns += [prefix + h for h in helpers]
        parts.append(fqns)
    return parts
