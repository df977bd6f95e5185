"""PEFT adapters spread across pipeline stages.

The pipeline splits the Hugging Face model inside the ``PeftModel``
(``peft_model.get_base_model()``), whose layers already carry the adapter
modules; each adapter therefore lives on the stage of the layer it adapts,
under the unsplit FQN (``model.layers.3.self_attn.q_proj.lora_A.default.weight``).
To export, each pipeline rank turns its stage's tensors into PEFT's adapter
keys, the small adapter tensors are gathered on pipeline rank 0, and it
writes a normal adapter directory that ``PeftModel.from_pretrained`` loads.

What can be split: methods that adapt layers in place (LoRA, DoRA, IA3, LoKr,
``modules_to_save``), one adapter at a time. :func:`check_peft_model_can_split`
refuses the rest (prompt learning, several adapters, adapters on modules no
stage holds) before any collective.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import sharded_like
from .errors import PipelineConfigError
from .layout import compact_fqns

__all__ = [
    "is_peft_model", "unwrap_peft", "trainable_state", "save_pipeline_adapter", "load_pipeline_adapter",
    "adapter_parameter_names", "check_peft_config_can_initialize", "check_adapters_can_initialize", "make_adapter_initializer",
    "check_peft_model_can_split", "active_adapter_name", "adapter_subdir", "weightless_copy",
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


def weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules and settings whose parameters and buffers are all on the meta device.

    What a pipeline keeps of a PeftModel after the split: its adapter configuration, names and structure
    (what PEFT's key functions read), none of its weights. ``model`` itself is left as it is, so once the
    caller drops it, its tensors are freed.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
        >>> shell = weightless_copy(peft_model)
        >>> {p.device.type for p in shell.parameters()}, shell.peft_config == peft_model.peft_config
        ({'meta'}, True)
        >>> {p.device.type for p in peft_model.parameters()}
        {'cpu'}
    """
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = tensor.detach().to("meta")
        # deepcopy consults the memo before copying: these take the place of every registered tensor.
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


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
    Like ``save_pretrained``, an adapter not named "default" goes into the
    subdirectory of its name (see :func:`adapter_subdir`). A model with
    several adapters raises :class:`PipelineConfigError` before any collective.

    Example (every rank)::

        save_pipeline_adapter("out/adapter", peft_model, parts, pp_group)
        PeftModel.from_pretrained(base_model, "out/adapter")   # later, one process
    """
    from peft import get_peft_model_state_dict

    name = active_adapter_name(peft_model)  # raises on every rank alike, before the gather
    shares: list = [None] * dist.get_world_size(pp_group)
    state = trainable_state(peft_model, parts)  # on every replica: gathering FSDP shards is a DP collective
    dist.all_gather_object(shares, state if write else {}, group=pp_group)
    if write and dist.get_rank(pp_group) == 0:
        merged = {k: v for share in shares for k, v in share.items()}
        adapter = get_peft_model_state_dict(peft_model, state_dict=merged, adapter_name=name, save_embedding_layers=False)
        target = adapter_subdir(output_dir, name)
        os.makedirs(target, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(target, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        # As save_pretrained: the saved config is for inference and names the base model.
        config = copy.deepcopy(peft_model.peft_config[name])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(unwrap_peft(peft_model), "name_or_path", None) or None
        config.save_pretrained(target)
    dist.barrier(group=pp_group)


def load_pipeline_adapter(peft_model: nn.Module, parts: Sequence[nn.Module], adapter_dir: str) -> None:
    """Copy an adapter directory's weights into this rank's stages (only the keys they hold).

    ``adapter_dir`` is what :func:`save_pipeline_adapter` was given: an
    adapter not named "default" is read from its subdirectory when there is one.
    """
    from peft import get_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    name = active_adapter_name(peft_model)
    sub = adapter_subdir(adapter_dir, name)
    if os.path.isfile(os.path.join(sub, ADAPTER_WEIGHTS)):
        adapter_dir = sub
    prefix = _peft_prefix(peft_model)
    saved = load_peft_weights(adapter_dir, device="cpu")
    for part in parts:
        for pname, param in part.named_parameters():
            # Ask PEFT how it spells this parameter in a saved adapter (if it is part of one).
            spelled = get_peft_model_state_dict(peft_model, state_dict={prefix + pname: param}, adapter_name=name,
                                                save_embedding_layers=False)
            for key in spelled:
                if key not in saved:
                    raise KeyError(f"Adapter tensor {key!r} is missing from {adapter_dir!r}.")
                with torch.no_grad():
                    param.copy_(sharded_like(saved[key], param))


def adapter_subdir(output_dir: str, adapter_name: str) -> str:
    """Where PEFT's ``save_pretrained`` puts adapter ``adapter_name``: ``output_dir`` for "default", else a subdirectory.

    Example:
        >>> adapter_subdir("out", "default"), adapter_subdir("out", "sql")
        ('out', 'out/sql')
    """
    return output_dir if adapter_name == "default" else os.path.join(output_dir, adapter_name)


def active_adapter_name(peft_model: nn.Module) -> str:
    """The name of the PeftModel's one adapter; refuses a model with several (see :func:`check_peft_model_can_split`)."""
    _check_one_adapter(peft_model)
    return next(iter(peft_model.peft_config))


_SPLITTABLE = ("methods that adapt the model's own layers in place split with them: LoRA (also DoRA, "
               "target_modules='all-linear', modules_to_save), IA3 or LoKr")


def _refuse_prompt_learning(config: Any, adapter: str | None = None) -> None:
    if getattr(config, "is_prompt_learning", False):
        method = getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__
        which = f"PEFT adapter {adapter!r}" if adapter else f"The {type(config).__name__}"
        raise PipelineConfigError(
            f"{which} is {method}, a prompt-learning method: PeftModel.forward adds its virtual "
            f"tokens (or per-layer prefixes) outside the model's layers, which pipeline stages never run, so it "
            f"cannot be split. Use pp_size=1 for it, or a method that pipelining supports; {_SPLITTABLE}."
        )


def _check_one_adapter(peft_model: nn.Module) -> None:
    configs = peft_model.peft_config
    active = getattr(peft_model, "active_adapters", None)
    active = [active] if isinstance(active, str) else list(active or [])
    if len(configs) > 1 or len(active) > 1:
        raise PipelineConfigError(
            f"The PeftModel holds adapters {sorted(configs)} (active: {active}); pipeline training trains and saves "
            "exactly one. Keep one adapter (peft_model.delete_adapter(name) for the others), or combine them into "
            "one first (add_weighted_adapter, or merge_and_unload into the base model)."
        )


def _adapter_modules(model: nn.Module) -> list[str]:
    """FQNs of the modules PEFT put into ``model`` (tuner layers, ``modules_to_save`` wrappers), outermost only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Wrapper
    except ImportError:  # older peft: modules_to_save is the only wrapper
        from peft.utils.other import ModulesToSaveWrapper as Wrapper
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, Wrapper)) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def check_peft_model_can_split(model: nn.Module, fqns_per_stage: Sequence[Sequence[str]] | None = None) -> None:
    """Refuse a PeftModel that pipeline stages cannot train; pure, so every rank raises alike before any collective.

    Refused, each with a :class:`PipelineConfigError` saying what to change:
    prompt-learning methods (prompt tuning, prefix tuning, p-tuning), several
    adapters (or several active at once), and adapters on modules that lie
    outside every stage's module FQNs (named). ``fqns_per_stage`` are the
    stages' module FQNs within the base model (default: the model's pipeline
    plan). Other models pass unchanged.

    Example:
        >>> import torch.nn as nn
        >>> check_peft_model_can_split(nn.Linear(2, 2))  # not a PeftModel: nothing to refuse
    """
    if not is_peft_model(model):
        return
    for adapter, config in model.peft_config.items():
        _refuse_prompt_learning(config, adapter)
    _check_one_adapter(model)
    base = unwrap_peft(model)
    if fqns_per_stage is None:
        from .architectures import module_fqns_per_stage

        try:
            fqns_per_stage = module_fqns_per_stage(base, 1)
        except PipelineConfigError:
            return  # no pipeline plan: the stage-plan checks name the problem
    covered = list(dict.fromkeys(f for stage in fqns_per_stage for f in stage))
    outside = [n for n in _adapter_modules(base) if not any(n == f or n.startswith(f + ".") for f in covered)]
    if outside:
        more = f" and {len(outside) - 10} more" if len(outside) > 10 else ""
        raise PipelineConfigError(
            f"PEFT adapters sit on modules that no pipeline stage holds: {outside[:10]}{more}. The stages hold "
            f"{', '.join(compact_fqns(covered))}; target modules inside them (e.g. target_modules='all-linear' or the "
            "decoder layers' projections), or put these modules into a stage (module_fqns_per_model_part)."
        )


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
    _refuse_prompt_learning(config)
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
