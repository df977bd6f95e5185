"""Models larger than one process: build on the meta device, give memory to this rank's stages only.

The flow (used by :class:`hf_pp.PipelineTrainer` and :class:`hf_pp.AutoPipeline`
when handed a model directory or a meta-device model)::

    model = meta_model_from_pretrained("path/to/model")       # shapes only, no memory
    part = copy_stage_module(model, fqns_of_my_stage)          # still meta
    materialize_stage(part, "cpu", CheckpointIndex("path/to/model"))

``materialize_stage`` allocates the stage on its device, reads exactly its
tensors from the checkpoint (see :mod:`hf_pp.safetensors_reader`), and lets
the model's own ``initialize_weights`` fill whatever the checkpoint does not
hold: rotary inverse frequencies and other non-persistent buffers, computed
on the real device, and every weight when there is no checkpoint at all.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import PipelineConfigError
from .safetensors_reader import CheckpointIndex
from .weight_conversion import ConvertedCheckpoint

__all__ = [
    "LOAD_DTYPES",
    "has_meta_tensors",
    "resolve_dtype",
    "check_dtype_runs",
    "auto_class_for",
    "meta_model",
    "HUB_KWARGS",
    "check_hub_kwargs",
    "load_pretrained_config",
    "meta_model_from_pretrained",
    "stage_checkpoint",
    "checkpoint_key",
    "missing_checkpoint_tensors",
    "materialize_stage",
]

_PEFT_WRAPPED = ".base_layer."  # PEFT moves a wrapped layer's own weights under base_layer
_MODULES_TO_SAVE = re.compile(r"\.(original_module|modules_to_save\.[^.]+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_DTYPES = ("auto", *_DTYPES)


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` lives on the meta device (holds no data)."""
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def resolve_dtype(dtype: str | torch.dtype | None, config: Any = None) -> torch.dtype:
    """A torch dtype from ``torch.float32``, ``"bfloat16"`` or ``"auto"`` (the checkpoint's own dtype).

    Example:
        >>> resolve_dtype("bfloat16"), resolve_dtype(None)
        (torch.bfloat16, torch.float32)
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return resolve_dtype(saved if saved != "auto" else None)
    if dtype not in _DTYPES:
        raise PipelineConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or 'auto'.")
    return _DTYPES[dtype]


def check_dtype_runs(dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse a dtype the device cannot train in: probe a tiny matmul forward and backward.

    Example:
        >>> check_dtype_runs(torch.float32, "cpu")
        >>> check_dtype_runs(torch.int8, "cpu")
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: Cannot train in torch.int8: weights must be a floating-point dtype; use torch.float32 or torch.bfloat16.
    """
    if not dtype.is_floating_point:
        raise PipelineConfigError(f"Cannot train in {dtype}: weights must be a floating-point dtype; use torch.float32 or torch.bfloat16.")
    try:
        weight = torch.ones(4, 4, dtype=dtype, device=device, requires_grad=True)
        (torch.ones(2, 4, dtype=dtype, device=device) @ weight).sum().backward()
    except (RuntimeError, NotImplementedError, TypeError) as error:
        raise PipelineConfigError(
            f"The device {device} cannot run {dtype} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "use torch.float32, or torch.bfloat16 where the device supports it."
        ) from None


def auto_class_for(config: Any) -> Any:
    """The ``AutoModelFor...`` class a saved config's ``architectures`` asks for: sequence or token classification,
    image-text-to-text for a vision-language model, or (otherwise) causal LM.

    Example:
        >>> from transformers import LlamaConfig
        >>> auto_class_for(LlamaConfig(architectures=["LlamaForSequenceClassification"])).__name__
        'AutoModelForSequenceClassification'
        >>> auto_class_for(LlamaConfig()).__name__
        'AutoModelForCausalLM'
    """
    from transformers import (
        AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or ():
        if name.endswith("ForSequenceClassification"):
            return AutoModelForSequenceClassification
        if name.endswith("ForTokenClassification"):
            return AutoModelForTokenClassification
    if getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and \
            getattr(config, "vision_config", None) is not None:
        return AutoModelForImageTextToText  # a vision-language model: its *ForConditionalGeneration
    return AutoModelForCausalLM


def meta_model(config: Any, dtype: torch.dtype | None = None, model_cls: Any = None) -> nn.Module:
    """The model for ``config`` on the meta device: shapes and dtypes, no memory.

    Example:
        >>> from transformers import LlamaConfig
        >>> m = meta_model(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                            num_attention_heads=2), dtype=torch.bfloat16)
        >>> m.lm_head.weight.device, m.lm_head.weight.dtype
        (device(type='meta'), torch.bfloat16)
    """
    if model_cls is None:
        model_cls = auto_class_for(config)
    # Building in the dtype (not casting afterwards) keeps what the class keeps in float32 (rotary frequencies).
    build = getattr(model_cls, "from_config", None) or model_cls._from_config
    with torch.device("meta"):
        return build(config, dtype=dtype) if dtype is not None else build(config)


# What per-stage loading passes to the hub resolution (``from_pretrained``'s keywords of the same names).
HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download", "proxies")


def check_hub_kwargs(kwargs: dict | None, argument: str = "from_pretrained_kwargs") -> dict:
    """The hub keywords of ``kwargs``; anything else is refused, named.

    Example:
        >>> check_hub_kwargs({"revision": "main"})
        {'revision': 'main'}
    """
    unknown = sorted(set(kwargs or {}) - set(HUB_KWARGS))
    if unknown:
        raise PipelineConfigError(
            f"{argument} takes the keywords from_pretrained resolves a checkpoint with, {list(HUB_KWARGS)}; got "
            f"{unknown}. For the dtype set pp_load_dtype."
        )
    return dict(kwargs or {})


def load_pretrained_config(source: str, trust_remote_code: bool = False, **hub_kwargs):
    """The config of a local ``save_pretrained`` directory or a hub id, resolved as ``from_pretrained`` does."""
    from transformers import AutoConfig

    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, hub_kwargs.get("subfolder") or "", "config.json")):
        raise PipelineConfigError(f"{source!r} is not a model directory (no config.json); pass a save_pretrained() directory.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        how = (f"this machine is offline (HF_HUB_OFFLINE=1) and {source!r} is not in the hub cache: fetch it where the "
               f"hub is reachable (e.g. `hf download {source}`) into the same HF_HOME") if offline else str(error)
        raise PipelineConfigError(f"Cannot load the config of {source!r}: {how}.") from None


def meta_model_from_pretrained(source: str, dtype: str | torch.dtype | None = "auto", model_cls: Any = None,
                               trust_remote_code: bool = False, **hub_kwargs) -> nn.Module:
    """The model of a local ``save_pretrained`` directory or a hub id, built on the meta device (weights not read).

    ``dtype="auto"`` keeps the dtype the checkpoint was saved in, as
    ``from_pretrained`` does. ``hub_kwargs``: see :data:`HUB_KWARGS`. Materialise stages of it with
    :func:`materialize_stage` and a :class:`~hf_pp.safetensors_reader.CheckpointIndex` of the same source.
    """
    config = load_pretrained_config(os.fspath(source), trust_remote_code, **hub_kwargs)
    return meta_model(config, resolve_dtype(dtype, config), model_cls)


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """``{tied parameter: the parameter it copies}`` as the model declares it (``lm_head.weight -> embed``)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def checkpoint_key(name: str, index: CheckpointIndex, tied: dict[str, str]) -> str:
    """The checkpoint tensor that fills parameter/buffer ``name`` of a (possibly PEFT-wrapped) model.

    PEFT keeps a wrapped layer's weights under ``base_layer`` and
    ``modules_to_save`` starts from a copy of the original; a tied weight left
    out of the checkpoint (``lm_head.weight``) reads its source.
    """
    # PEFT keeps wrapped weights under base_layer, and modules_to_save copies the original module.
    key = _MODULES_TO_SAVE.sub(".", name.replace(_PEFT_WRAPPED, "."))
    if key not in index and key in tied and tied[key] in index:
        return tied[key]
    return key


def _needed_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers) of ``module`` that a checkpoint should provide, by FQN."""
    adapters = _adapter_names(module)
    state = module.state_dict(keep_vars=True)
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    weights = {n: t for n, t in state.items() if n in params and n not in adapters}
    buffers = {n: t for n, t in state.items() if n not in params}
    return weights, buffers


def _adapter_names(module: nn.Module) -> set[str]:
    """PEFT adapter weights are new: initialised, never read from the base checkpoint."""
    from .peft_utils import adapter_parameter_names

    return adapter_parameter_names(module)


def stage_checkpoint(index: CheckpointIndex, module: nn.Module) -> ConvertedCheckpoint:
    """``index`` under ``module``'s names (transformers' conversion rules applied), limited to what it holds."""
    tied = _tied_sources(module)
    names = {_MODULES_TO_SAVE.sub(".", name.replace(_PEFT_WRAPPED, ".")) for name in module.state_dict(keep_vars=True)}
    return ConvertedCheckpoint(index, module, names | {tied[n] for n in names if n in tied})


def missing_checkpoint_tensors(model: nn.Module, index: CheckpointIndex) -> list[str]:
    """Parameters of ``model`` (any device, meta is fine) that ``index`` cannot fill, even converted."""
    tied = _tied_sources(model)
    weights, _ = _needed_tensors(model)
    source = stage_checkpoint(index, model)
    return [name for name in weights if checkpoint_key(name, source, tied) not in source]


def materialize_stage(part: nn.Module, device: torch.device | str, index: CheckpointIndex | None = None,
                      init_adapters: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Give a meta-device stage module real memory on ``device`` and fill it; returns ``part``.

    With ``index``, every parameter and persistent buffer it holds is read
    from the checkpoint (missing parameters are an error naming them). The
    rest (non-persistent buffers such as rotary frequencies, or everything
    without ``index``) is initialised by the model's own ``initialize_weights``
    on ``device``; ``init_adapters`` (e.g. PEFT's LoRA init) runs first for
    adapter weights. Tied parameters inside the stage stay tied.

    Example:
        >>> from transformers import LlamaConfig
        >>> m = meta_model(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                            num_attention_heads=2))
        >>> materialize_stage(m, "cpu").model.norm.weight[:3]
        tensor([1., 1., 1.], grad_fn=<SliceBackward0>)
    """
    ties = _shared_parameters(part)
    weights, _ = _needed_tensors(part)
    tied = _tied_sources(part)
    if index is not None:
        index = stage_checkpoint(index, part)
        missing = [n for n in weights if checkpoint_key(n, index, tied) not in index]
        if missing:
            raise PipelineConfigError(
                f"{index.directory!r} lacks tensors this stage needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}. "
                "Check that the checkpoint was saved from this model class and config."
            )
    part.to_empty(device=device)
    _retie(part, ties)
    weights, buffers = _needed_tensors(part)  # to_empty made new tensors
    loaded: dict[str, torch.Tensor] = {}
    if index is not None:
        loaded = dict(weights)
        loaded.update({n: b for n, b in buffers.items() if checkpoint_key(n, index, tied) in index})
        index.read_into({checkpoint_key(n, index, tied): t for n, t in loaded.items()})
    for tensor in loaded.values():
        tensor._is_hf_initialized = True  # transformers' init skips flagged tensors
    if _adapter_names(part):
        from .peft_utils import make_adapter_initializer

        (init_adapters or make_adapter_initializer())(part)
    _initialize_rest(part, unloaded_buffers=[n for n, _ in part.named_buffers() if n not in loaded])
    return part


def _shared_parameters(module: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, groups: list[list[str]]) -> None:
    """``to_empty`` gives each module its own new tensor: point tied names at one parameter again."""
    for first, *others in groups:
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)


@torch.no_grad()
def _initialize_rest(part: nn.Module, unloaded_buffers: list[str]) -> None:
    """Initialise what was not loaded, the way the model class initialises a fresh model."""
    from transformers import PreTrainedModel

    if isinstance(part, PreTrainedModel):
        part.initialize_weights()
        return
    # Plain torch modules: their own reset_parameters; buffers cannot be recomputed generically.
    if unloaded_buffers:
        raise PipelineConfigError(
            f"{type(part).__name__} was built on the meta device, and its buffers {unloaded_buffers[:4]} cannot be "
            "recomputed for a plain torch module: build it on a real device, or load it from a checkpoint."
        )
    for module in part.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)):
            reset()
