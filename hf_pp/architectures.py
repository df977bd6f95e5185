"""What hf_pp knows about Hugging Face architectures.

Three kinds of facts, all declarative:

* the **pipeline plan** of a model: which modules come before the decoder
  layers (embeddings), the layer container, which come after (final norm),
  and the CausalLM head. Read from ``config.base_model_pp_plan`` and the
  CausalLM ``_pp_plan``; :data:`OWN_PLANS` adds plans for popular models
  whose config has none;
* per-architecture **quirks** (:data:`QUIRKS`): embedding multipliers, logit
  scaling and soft-capping, that the generic patched forwards in
  :mod:`hf_pp.hf_patching` apply so the numbers match the unsplit model;
* **support**: :func:`check_support` says whether a model or config can be
  pipelined, and why not.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import torch.nn as nn

from .errors import PipelineConfigError
from .multimodal import MultimodalLayout, is_multimodal_config, multimodal_layout, multimodal_support_reason
from .split import module_at
from .stage_math import layered_model_fqns_per_stage

__all__ = [
    "max_positions", "model_text_config",
    "StageLayout",
    "Quirks",
    "SupportInfo",
    "OWN_PLANS",
    "QUIRKS",
    "UNSUPPORTED",
    "stage_layout",
    "quirks_for",
    "is_sequence_classifier",
    "is_token_classifier",
    "check_support",
    "require_support",
    "disable_cache_for_training",
    "num_decoder_layers",
    "PlanPieces",
    "plan_pieces",
    "module_fqns_per_stage",
    "module_at",
]


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """The plan of one architecture, as module names relative to the decoder.

    ``prefix`` is the CausalLM attribute holding the decoder (``"model"``),
    empty when the model is the decoder itself; a dotted path for a VLM
    (``"model.language_model"``), whose ``multimodal`` says where the rest is.
    """

    prefix: str
    before: tuple[str, ...]
    layers: str
    after: tuple[str, ...]
    head: tuple[str, ...]
    multimodal: MultimodalLayout | None = None  # a VLM: where its vision parts and language model are


@dataclasses.dataclass(frozen=True)
class Quirks:
    """Numbers an architecture applies outside its modules, named by config attribute.

    ``embed_multiplier``: input embeddings are multiplied by this config value;
    ``logit_multiplier`` / ``logit_divisor``: logits are multiplied / divided;
    ``final_softcap``: ``logits = cap * tanh(logits / cap)``;
    ``position_embedding``: a first-stage module fed ``position_ids`` whose
    output is added to the token embeddings (GPT-2 style);
    ``nope_layer_types``: attention types whose layers get no rotary embedding;
    ``sliding_full_attention``: "full_attention" layers use the sliding-window
    mask whenever ``config.sliding_window`` is set;
    ``mask_aliases``: (layer type, mask kind) pairs for architectures that name
    their attention types their own way;
    ``nope_attention_scaling``: name of a function of the model's own modeling
    module mapping ``position_ids`` to the ``attention_scaling`` its NoPE layers take;
    ``layer_masks``: (layer keyword, mask kind) pairs of extra masks every layer
    takes besides ``attention_mask`` (Inkling's ``conv_mask``);
    ``layer_scratch``: layer keywords that name a dict the layers of one forward
    share (Gemma 4's ``shared_kv_states``); each stage forward passes a fresh one;
    ``logit_vocab_limit``: config attribute; logits beyond that many columns are
    dropped when it is set (a head padded past the real vocabulary).
    """

    embed_multiplier: str | None = None
    logit_multiplier: str | None = None
    logit_divisor: str | None = None
    final_softcap: str | None = None
    position_embedding: str | None = None
    nope_layer_types: tuple[str, ...] = ()
    nope_attention_scaling: str | None = None
    sliding_full_attention: bool = False
    mask_aliases: tuple[tuple[str, str], ...] = ()
    layer_masks: tuple[tuple[str, str], ...] = ()
    layer_scratch: tuple[str, ...] = ()
    logit_vocab_limit: str | None = None


@dataclasses.dataclass(frozen=True)
class SupportInfo:
    """Answer of :func:`check_support`: ``supported`` and, when not, ``reason``."""

    supported: bool
    reason: str = ""


# Plans of our own for models whose config carries no base_model_pp_plan:
# module names in forward order; the layer container is named by "layers".
OWN_PLANS: dict[str, dict[str, Any]] = {
    "olmoe": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "stablelm": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "granitemoe": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "granitemoeshared": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "nemotron": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "persimmon": {"before": ("embed_tokens",), "layers": "layers", "after": ("final_layernorm",)},
    "hunyuan_v1_dense": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "hunyuan_v1_moe": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "phimoe": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "jetmoe": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "diffllama": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "bitnet": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
    "gpt2": {"before": ("wte", "wpe", "drop"), "layers": "h", "after": ("ln_f",)},
    "qwen3_vl_text": {"before": ("embed_tokens",), "layers": "layers", "after": ("norm",)},
}

_GRANITE = Quirks(embed_multiplier="embedding_multiplier", logit_divisor="logits_scaling")
_SOFTCAP = Quirks(final_softcap="final_logit_softcapping")
_COHERE = Quirks(logit_multiplier="logit_scale")
QUIRKS: dict[str, Quirks] = {
    "granite": _GRANITE,
    "granite_swa": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoeshared": _GRANITE,
    "hyperclovax": Quirks(embed_multiplier="embedding_multiplier", logit_multiplier="logits_scaling"),
    "minicpm3": Quirks(logit_divisor="logits_scaling"),
    "beam": Quirks(final_softcap="final_logit_softcapping", nope_attention_scaling="compute_attention_scaling"),
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "cohere2_moe": _COHERE,
    "cohere_compass_text": _COHERE,  # logit_scale may be None there: no scaling
    "gemma2": _SOFTCAP,
    "gemma3_text": _SOFTCAP,
    "gemma4_text": _SOFTCAP,
    "vaultgemma": _SOFTCAP,
    "lara_mini": Quirks(nope_layer_types=("full_attention", "linear_attention")),
    "minimax": Quirks(sliding_full_attention=True),
    "gpt2": Quirks(position_embedding="wpe"),
    # Vision-language models whose head scales the logits by a text-config value.
    "hyperclovax_vision_v2": Quirks(logit_multiplier="logits_scaling"),
    "granite_docling": Quirks(logit_divisor="logits_scaling"),
    "granite_docling_text": Quirks(embed_multiplier="embedding_multiplier"),
    # Its config carries sliding_window, but its decoder builds one causal mask for every layer.
    "qwen3_vl_moe_text": Quirks(mask_aliases=(("sliding_attention", "full_attention"),)),
    # Without a cache (training) its reference sliding mask ORs in the causal mask: every layer is full causal.
    "unlimited_ocr_text": Quirks(mask_aliases=(("reference_sliding_attention", "full_attention"),)),
    # One causal mask for every layer; its sparse layers' indexer narrows it inside attention (from position_ids).
    "minimax_m3_vl_text": Quirks(mask_aliases=(("minimax_m3_sparse", "full_attention"),)),
    "gemma4_unified_text": Quirks(final_softcap="final_logit_softcapping", layer_scratch=("shared_kv_states",)),
    "inkling_text": Quirks(
        mask_aliases=(("hybrid", "full_attention"), ("hybrid_sliding", "sliding_attention")),
        # Final hidden states are divided by the muP width multiplier before the (bias-free) head.
        logit_divisor="logits_mup_width_multiplier",
        layer_masks=(("conv_mask", "linear_attention"),),
        logit_vocab_limit="unpadded_vocab_size",
    ),
}

# Architectures with a plan that the generic forwards cannot run, and why.
# Filled from the parity sweep (docs/architectures.md); each reason is specific.
_PER_LAYER_INPUTS = (
    "every decoder layer also reads per-layer input embeddings (embed_tokens_per_layer) computed from the "
    "token ids on the first stage; they would have to cross every stage boundary, which hf_pp does not do"
)
_HYPER_CONNECTIONS = (
    "hyper-connections keep several residual streams and mix them in hc_head outside base_model_pp_plan; "
    "the generic stage forward passes one hidden-state tensor between stages"
)
UNSUPPORTED: dict[str, str] = {
    "gemma3n_text": _PER_LAYER_INPUTS + " (and AltUp keeps several prediction streams)",
    "gemma4_text": _PER_LAYER_INPUTS,
    "deepseek_v4": _HYPER_CONNECTIONS,
    "hy_v4": _HYPER_CONNECTIONS,
    "hrm_text": (
        "a hierarchical recurrent model: H_module and L_module layer stacks are re-run for several cycles, "
        "so its base_model_pp_plan's 'layers' names no module and layers cannot be cut into one forward pass"
    ),
}


# Architectures that hf_pp runs except under some settings: (config -> refused?, reason).
_UNSUPPORTED_WHEN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "gemma4_unified_text": (
        lambda config: (getattr(config, "num_kv_shared_layers", 0) or 0) > 0,
        "num_kv_shared_layers > 0: the last layers reuse keys and values that earlier layers store in "
        "shared_kv_states, which would have to cross stage boundaries; hf_pp supports num_kv_shared_layers=0",
    ),
}


def _config_of(model_or_config: Any):
    return getattr(model_or_config, "config", model_or_config)


def _plan_of(config) -> dict[str, Any] | None:
    """(before, layers, after) names from the config plan or our own plan; None when neither."""
    own = OWN_PLANS.get(getattr(config, "model_type", ""))
    if own is not None:
        return own
    plan = getattr(config, "base_model_pp_plan", None)
    if not plan:
        return None
    names = list(plan)
    # The layer container is the plan entry that takes the attention mask.
    layers = next((n for n, (inputs, _) in plan.items() if "attention_mask" in inputs), None)
    if layers is None:
        return None
    i = names.index(layers)
    return {"before": tuple(names[:i]), "layers": layers, "after": tuple(names[i + 1 :])}


def stage_layout(model: nn.Module) -> StageLayout:
    """The :class:`StageLayout` of a Hugging Face model (whole or a stage copy).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> stage_layout(LlamaForCausalLM(cfg))
        StageLayout(prefix='model', before=('embed_tokens',), layers='layers', after=('norm',), head=('lm_head',), multimodal=None)
    """
    config = getattr(model, "config", None)
    if config is None:
        raise PipelineConfigError(
            f"{type(model).__name__} is not a Hugging Face model: pass module_fqns_per_model_part "
            "(one list of module FQNs per stage) to split it."
        )
    require_support(model)
    if is_multimodal_config(config):
        plan = _plan_of(config.get_text_config())
        vlm = multimodal_layout(model, plan["layers"])
        return StageLayout(vlm.language_model, tuple(plan["before"]), plan["layers"], tuple(plan["after"]),
                           ("lm_head",), vlm)
    plan = _plan_of(config)
    base = getattr(model, "base_model_prefix", "") or ""
    is_wrapper = base and base in model._modules
    prefix = base if is_wrapper else ""
    head: tuple[str, ...] = ()
    if is_wrapper:
        pp_plan = getattr(model, "_pp_plan", None) or {"lm_head": None}
        head = tuple(n for n in pp_plan if not n.startswith(base + ".") and n in model._modules)
        if not head and is_sequence_classifier(model):
            head = ("score",)
        elif not head and is_token_classifier(model):
            # In the order the forward runs them; GPT-2 and GPT-NeoX name the linear "classifier".
            head = tuple(n for n in ("dropout", "score", "classifier") if n in model._modules)
    return StageLayout(prefix, tuple(plan["before"]), plan["layers"], tuple(plan["after"]), head)


def is_sequence_classifier(model: nn.Module) -> bool:
    """Is this (whole or a stage copy) a decoder with a sequence-classification head?

    That is Hugging Face's ``*ForSequenceClassification`` for decoders: a
    ``score`` layer over the hidden states, read at each row's last non-pad token.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
        >>> is_sequence_classifier(LlamaForSequenceClassification(cfg)), is_sequence_classifier(LlamaForCausalLM(cfg))
        (True, False)
    """
    return type(model).__name__.endswith("ForSequenceClassification") and "score" in model._modules


def is_token_classifier(model: nn.Module) -> bool:
    """Is this (whole or a stage copy) a decoder with a token-classification head (dropout, then a linear
    ``score`` or ``classifier`` on every position), as Hugging Face's ``*ForTokenClassification`` for decoders?

    Example:
        >>> from transformers import LlamaConfig, LlamaForTokenClassification
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> is_token_classifier(LlamaForTokenClassification(cfg))
        True
    """
    return type(model).__name__.endswith("ForTokenClassification") and (
        "score" in model._modules or "classifier" in model._modules
    )


def quirks_for(config) -> Quirks:
    """The :class:`Quirks` of ``config.model_type`` (no quirks when unlisted).

    Example:
        >>> from transformers import GraniteConfig
        >>> quirks_for(GraniteConfig()).logit_divisor
        'logits_scaling'
    """
    return QUIRKS.get(getattr(config, "model_type", ""), Quirks())


def check_support(model_or_config: Any) -> SupportInfo:
    """Can hf_pp split this model (or a model of this config) by itself? If not, why.

    Example:
        >>> from transformers import LlamaConfig, T5Config
        >>> check_support(LlamaConfig()).supported
        True
        >>> check_support(T5Config()).reason
        'T5Config is an encoder-decoder model; hf_pp pipelines decoder-only causal LMs.'
    """
    config = _config_of(model_or_config)
    name = type(model_or_config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return SupportInfo(False, f"{name} is an encoder-decoder model; hf_pp pipelines decoder-only causal LMs.")
    if is_multimodal_config(config):
        reason = multimodal_support_reason(config, _plan_of)
        if reason is None and isinstance(model_or_config, nn.Module):
            try:  # a model also shows whether its parts are where a VLM's are
                multimodal_layout(model_or_config, _plan_of(config.get_text_config())["layers"])
            except PipelineConfigError as err:
                reason = str(err)
        return SupportInfo(reason is None, reason or "")
    for sub in ("audio_config", "speech_config"):
        if getattr(config, sub, None) is not None:
            return SupportInfo(
                False,
                f"{name} is a multimodal model ({sub}); hf_pp pipelines text-only causal LMs. "
                "Load its text-only *ForCausalLM, or pass module_fqns_per_model_part and your own stage forward.",
            )
    model_type = getattr(config, "model_type", "")
    if model_type in UNSUPPORTED:
        return SupportInfo(False, f"{name}: {UNSUPPORTED[model_type]}")
    refused, why = _UNSUPPORTED_WHEN.get(model_type, (None, ""))
    if refused is not None and refused(config):
        return SupportInfo(False, f"{name}: {why}")
    if _plan_of(config) is None:
        return SupportInfo(
            False,
            f"{name} ({model_type}) has no base_model_pp_plan and hf_pp has no plan of its own for it; "
            "pass module_fqns_per_model_part (one list of module FQNs per stage) and patch_*=False.",
        )
    return SupportInfo(True)


def require_support(model_or_config: Any) -> None:
    """Raise :class:`PipelineConfigError` with the reason when :func:`check_support` says no."""
    info = check_support(model_or_config)
    if not info.supported:
        raise PipelineConfigError(info.reason)


def disable_cache_for_training(model: nn.Module) -> None:
    """Turn ``config.use_cache`` off (with a warning): a KV cache cannot cross pipeline stages."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        warnings.warn(
            f"{type(model).__name__}: use_cache=True is not supported in pipeline training; setting it to False.",
            stacklevel=2,
        )
        config.use_cache = False


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers of a Hugging Face causal LM (``config.num_hidden_layers``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> num_decoder_layers(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=3, num_attention_heads=2, vocab_size=32)))
        3
    """
    config = getattr(model, "config", None)
    if config is None:
        raise PipelineConfigError(
            f"{type(model).__name__} is not a Hugging Face model: pass module_fqns_per_model_part "
            "(one list of module FQNs per stage) to split it."
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if layers is None:
        raise PipelineConfigError(
            f"Cannot tell how many layers {type(model).__name__} has (no num_hidden_layers in its config); "
            "pass module_fqns_per_model_part."
        )
    # Some configs count sub-layers (LongCat: 2 per block): the container decides how many modules there are.
    plan = _plan_of(text_config if is_multimodal_config(config) else config)
    if is_multimodal_config(config):
        decoder = module_at(model, stage_layout(model).prefix)
    else:
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    container = getattr(decoder, plan["layers"], None) if plan else None
    if isinstance(container, nn.ModuleList):
        layers = min(layers, len(container))
    return layers


def _weightless_helpers(decoder: nn.Module, layout: StageLayout) -> list[str]:
    """Children of the decoder outside the plan that hold no parameters (rotary embeddings...)."""
    planned = set(layout.before) | set(layout.after) | {layout.layers}
    return [
        name for name, child in decoder.named_children()
        if name not in planned and child is not None and not any(True for _ in child.parameters())
    ]


@dataclasses.dataclass(frozen=True)
class PlanPieces:
    """A model's plan as module FQNs: ``first`` (embeddings), ``layers``, ``last`` (final norm and head),
    and ``every`` (weightless helpers such as rotary embeddings, needed on every stage)."""

    first: tuple[str, ...]
    layers: tuple[str, ...]
    last: tuple[str, ...]
    every: tuple[str, ...]


def plan_pieces(model: nn.Module) -> PlanPieces:
    """The :class:`PlanPieces` of a Hugging Face model (any device, meta is fine).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> plan_pieces(LlamaForCausalLM(cfg))
        PlanPieces(first=('model.embed_tokens',), layers=('model.layers.0', 'model.layers.1'), last=('model.norm', 'lm_head'), every=('model.rotary_emb',))
    """
    layout = stage_layout(model)
    decoder = module_at(model, layout.prefix)
    p = f"{layout.prefix}." if layout.prefix else ""
    # A VLM's vision modules run before its embeddings are used: they go with them, on the first stage.
    encoders = layout.multimodal.encoders if layout.multimodal else ()
    return PlanPieces(
        first=encoders + tuple(p + n for n in layout.before if getattr(decoder, n, None) is not None),
        layers=tuple(f"{p}{layout.layers}.{i}" for i in range(num_decoder_layers(model))),
        last=tuple(p + n for n in layout.after if getattr(decoder, n, None) is not None) + layout.head,
        every=tuple(p + n for n in _weightless_helpers(decoder, layout)),
    )


def module_fqns_per_stage(model: nn.Module, num_stages: int,
                          layer_ranges: Sequence[range] | None = None) -> list[list[str]]:
    """Module FQNs of each of ``num_stages`` stages, from the model's pipeline plan.

    Embeddings go to the first stage, final norm and head to the last, layers
    are spread evenly (or as ``layer_ranges`` says, one range of layer indices
    per stage; the first and last stage may get none), weightless helpers
    (rotary embeddings) go everywhere.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> module_fqns_per_stage(LlamaForCausalLM(cfg), 2)
        [['model.embed_tokens', 'model.layers.0', 'model.rotary_emb'], ['model.layers.1', 'model.norm', 'lm_head', 'model.rotary_emb']]
        >>> module_fqns_per_stage(LlamaForCausalLM(cfg), 2, [range(0, 0), range(0, 2)])[0]
        ['model.embed_tokens', 'model.rotary_emb']
    """
    pieces = plan_pieces(model)
    if layer_ranges is None and num_stages > len(pieces.layers):
        raise PipelineConfigError(
            f"{num_stages} pipeline stages but {type(model).__name__} has only {len(pieces.layers)} decoder layers; "
            "use fewer stages (smaller pp size or fewer stages per rank)."
        )
    return layered_model_fqns_per_stage(num_stages, pieces.layers, first=pieces.first, last=pieces.last,
                                        every=pieces.every, layer_ranges=layer_ranges)


def model_text_config(model: nn.Module) -> Any:
    """The model's text config (its config itself for a causal LM), or None without a config."""
    config = getattr(model, "config", None)
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text sub-configs (encoder-decoder or multimodal): no single answer
        return config


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings``), or None."""
    return getattr(model_text_config(model), "max_position_embeddings", None)
