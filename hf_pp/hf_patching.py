"""Pipeline-friendly forwards for Hugging Face stage copies.

One generic decoder forward and one generic CausalLM forward serve every
supported architecture; what differs between architectures is read from the
config (``layer_types``, ``sliding_window``) and from the declarative
:data:`hf_pp.architectures.QUIRKS` table. Only the *instances* of a stage copy
are patched (``types.MethodType``), never a class, so the user's unsplit model
and every other model in the process keep their own forward.

A stage is tensor in, tensor out: stage 0 takes ``input_ids``, later stages
take hidden states; ``attention_mask`` (the 2-D padding mask) and
``position_ids`` may be given to every stage, which rebuilds its attention
masks itself (no mask crosses a stage boundary), unless a precomputed
``causal_mask_mapping`` (attention type -> mask, as Hugging Face forwards
build it) is given to every stage. No KV cache.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers import masking_utils
from transformers.modeling_outputs import BaseModelOutputWithPast

from .architectures import (
    StageLayout, disable_cache_for_training, is_sequence_classifier, is_token_classifier, module_at, quirks_for,
    stage_layout,
)
from .errors import PipelineConfigError
from .multimodal import (
    LANGUAGE_MODEL_KWARGS_UNUSED, language_model_positions, masks_from_transport, stage_image_inputs,
)

__all__ = [
    "patch_hf_model_for_pp", "pipeline_decoder_forward", "pipeline_causal_lm_forward",
    "pipeline_sequence_classification_forward", "pipeline_token_classification_forward", "last_token_index",
    "build_mask_mapping",
]

# How each attention type of config.layer_types gets its mask (transformers' own builders).
_MASK_BUILDERS: dict[str, Callable] = {
    "full_attention": masking_utils.create_causal_mask,
    "indexed_attention": masking_utils.create_causal_mask,
    "sliding_attention": masking_utils.create_sliding_window_causal_mask,
    "chunked_attention": masking_utils.create_chunked_causal_mask,
    "linear_attention": masking_utils.create_recurrent_attention_mask,
    "mamba": masking_utils.create_recurrent_attention_mask,
    "conv": masking_utils.create_recurrent_attention_mask,
}


def _default_attention_type(config) -> str:
    """The attention type of every layer of a config without ``layer_types`` (Mistral-style)."""
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


def _layer_type(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else _default_attention_type(config)


def _mask_kind(config, layer_type: str) -> str:
    """The mask builder key of an attention type (some architectures slide their "full" layers)."""
    quirks = quirks_for(config)
    if layer_type == "full_attention" and quirks.sliding_full_attention:
        return _default_attention_type(config)
    return dict(quirks.mask_aliases).get(layer_type, layer_type)


def build_mask_mapping(config, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor, layer_types: set[str]) -> dict[str, Any]:
    """``{attention type: mask}`` for the attention types of this stage's layers.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=8, num_attention_heads=2)
        >>> cfg._attn_implementation = "eager"
        >>> m = build_mask_mapping(cfg, torch.zeros(1, 3, 8), None, torch.arange(3)[None], {"full_attention"})
        >>> m["full_attention"].shape
        torch.Size([1, 1, 3, 3])
    """
    masks = {}
    for layer_type in layer_types:
        builder = _MASK_BUILDERS.get(_mask_kind(config, layer_type))
        if builder is None:
            raise PipelineConfigError(
                f"{type(config).__name__} has layers of attention type {layer_type!r}, for which hf_pp builds no mask."
            )
        masks[layer_type] = builder(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
        )
    return masks


# Shapes whose masks a stage keeps (see _masks_per_shape); dynamic padding passes an attention_mask and is not cached.
_MASK_SHAPES_KEPT = 8


def _masks_per_shape(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                     layer_types: set[str]) -> dict[str, Any]:
    """:func:`build_mask_mapping` for rows without padding and with the default positions, built once per shape.

    Those masks depend only on the shape, dtype and device of the hidden states
    (and the attention implementation), not on the microbatch: the stage keeps them
    and hands every microbatch of every step the same tensors.
    """
    key = (tuple(hidden.shape[:2]), hidden.dtype, hidden.device, getattr(decoder.config, "_attn_implementation", None),
           frozenset(layer_types))
    cache = decoder.__dict__.setdefault("_hf_pp_masks", OrderedDict())
    if key not in cache:
        cache[key] = build_mask_mapping(decoder.config, hidden, None, position_ids, layer_types)
        while len(cache) > _MASK_SHAPES_KEPT:
            cache.popitem(last=False)
    return cache[key]


def _masks_from_mapping(config, mapping: dict[str, Any], needed: set[str]) -> dict[str, Any]:
    """This stage's masks picked from a precomputed ``causal_mask_mapping``.

    A layer type is looked up by its own name, then by the mask kind it uses
    (an architecture's alias, e.g. Inkling's "hybrid" -> "full_attention").
    """
    masks, missing = {}, []
    for layer_type in sorted(needed):
        for key in (layer_type, _mask_kind(config, layer_type)):
            if key in mapping:
                masks[layer_type] = mapping[key]
                break
        else:
            missing.append(layer_type)
    if missing:
        raise PipelineConfigError(
            f"causal_mask_mapping has no mask for attention type(s) {missing} of this stage's layers "
            f"(it has {sorted(mapping)}); add them, or pass no causal_mask_mapping and let the stage build its masks."
        )
    return masks


def _accepts(fn: Callable, name: str) -> bool:
    # Bound methods are new objects on every access: key the cache on the function itself.
    return _function_accepts(getattr(fn, "__func__", fn), name)


@functools.lru_cache(maxsize=None)
def _function_accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes ``name`` (or ``**kwargs``); inspect.signature is slow in the per-layer hot path."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=None)
def _names_parameter(fn: Callable, name: str) -> bool:
    """Whether ``fn`` names ``name`` among its parameters (``**kwargs`` does not count)."""
    return name in inspect.signature(fn).parameters


def _position_embeddings(decoder: nn.Module, hidden, position_ids, layer_types: set[str]) -> dict[str, Any]:
    """Rotary (cos, sin) per attention type, from the decoder's weightless rotary module, if any."""
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        return {}
    config = decoder.config
    # Layer types without rotary (NoPE): listed as quirks, or a per-type rope_parameters entry of None.
    per_type = getattr(config, "rope_parameters", None)
    nope = set(quirks_for(config).nope_layer_types)
    if isinstance(per_type, dict) and set(per_type) & set(_MASK_BUILDERS):
        nope |= {t for t in layer_types if per_type.get(t) is None}
    if _names_parameter(getattr(rotary.forward, "__func__", rotary.forward), "layer_type"):
        return {t: None if t in nope else rotary(hidden, position_ids, layer_type=t) for t in layer_types}
    shared = rotary(hidden, position_ids)
    return {t: None if t in nope else shared for t in layer_types}


def _refuse_cache(kwargs: dict) -> None:
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            raise PipelineConfigError(f"A KV cache ({key}=...) cannot be used in pipeline training; pass none.")
    if kwargs.get("use_cache"):
        raise PipelineConfigError("use_cache=True cannot be used in pipeline training; pass use_cache=False.")


def _split_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(positions for masks and layers, positions for the rotary embedding)``.

    Multimodal rotary positions (Qwen-VL) are ``[sections, batch, seq]``; with four sections the first are the
    text positions, as the Hugging Face language models read them.
    """
    if position_ids.dim() == 3:
        return (position_ids[0], position_ids[1:]) if position_ids.shape[0] == 4 else (None, position_ids)
    return position_ids, position_ids


def pipeline_decoder_forward(self: nn.Module, x: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                             position_ids: torch.Tensor | None = None,
                             causal_mask_mapping: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
    """Forward of a decoder stage: token ids (stage 0) or hidden states in, hidden states out.

    Bound to a decoder instance by :func:`patch_hf_model_for_pp`, which also
    sets ``self._hf_pp_layout``. Runs the plan's first-stage modules when
    present, the stage's layers with masks and rotary embeddings built here,
    then the plan's last-stage modules when present.

    ``causal_mask_mapping`` (``{attention type: mask}``, e.g. ``"full_attention"``
    and ``"sliding_attention"``; an ``attention_mask`` that is such a dict counts
    as one, as in Hugging Face forwards) is used as given: each layer takes
    ``causal_mask_mapping[its layer type]`` (or the entry of the mask kind an
    architecture aliases that type to), and a type of this stage missing from
    it raises :class:`PipelineConfigError`. Without it the stage builds
    its masks from ``attention_mask`` (the 2-D padding mask) and ``position_ids``.
    """
    _refuse_cache(kwargs)
    layout: StageLayout = self._hf_pp_layout
    config = self.config
    quirks = quirks_for(config)
    # Called by a VLM's own forward (first stage): merged embeddings in, a Hugging Face output back.
    from_vlm = x is None and kwargs.get("inputs_embeds") is not None
    if from_vlm:
        x = kwargs.pop("inputs_embeds")
        if quirks.embed_multiplier:  # the language model scales what it is given, image features included
            x = x * getattr(config, quirks.embed_multiplier)
        visual_pos_masks, deepstack = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in LANGUAGE_MODEL_KWARGS_UNUSED)
        if unknown:
            raise PipelineConfigError(
                f"The VLM hands its language model {unknown}, which hf_pp's stage forward does not apply; it cannot "
                "split this model without changing its results."
            )
    else:
        visual_pos_masks = deepstack = None
    if x.is_floating_point():
        hidden = x
    else:
        # Stage 0: embeddings (and embedding dropout etc.) in plan order.
        hidden = x
        for name in layout.before:
            module = getattr(self, name, None)
            if module is None:
                raise PipelineConfigError(
                    f"Stage got token ids but holds no {name!r}; token ids go to the stage with the embeddings."
                )
            if name == quirks.position_embedding:
                continue
            hidden = module(hidden)
            if name == layout.before[0]:
                if quirks.embed_multiplier:
                    hidden = hidden * getattr(config, quirks.embed_multiplier)
                if quirks.position_embedding:
                    pos = position_ids if position_ids is not None else torch.arange(x.shape[1], device=x.device)[None]
                    hidden = hidden + getattr(self, quirks.position_embedding)(pos)
    positions_given = position_ids is not None
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_ids, rotary_positions = _split_positions(position_ids)

    container = getattr(self, layout.layers, None)
    layers = [] if container is None else [
        (int(name), layer) for name, layer in container._modules.items()
        if layer is not None and int(name) < config.num_hidden_layers
    ]
    if deepstack is not None:
        here = {index for index, _ in layers}
        missing = [i for i in range(len(deepstack)) if i not in here]
        if missing:
            raise PipelineConfigError(
                f"The VLM adds image features into decoder layers 0-{len(deepstack) - 1}, but layers {missing} are not "
                "on the first stage; put them there (module_fqns_per_model_part or pp_layers_per_stage)."
            )
    types_here = {_layer_type(config, i) for i, _ in layers}
    # Extra masks some layers take (Inkling's conv_mask), keyed by their mask kind.
    mask_types = types_here | {kind for _, kind in quirks.layer_masks} if layers else set()
    if causal_mask_mapping is None and isinstance(attention_mask, dict):
        causal_mask_mapping, attention_mask = attention_mask, None
    if causal_mask_mapping is not None:
        masks = _masks_from_mapping(config, causal_mask_mapping, mask_types)
    elif attention_mask is None and not positions_given:
        masks = _masks_per_shape(self, hidden, position_ids, mask_types)
    else:
        masks = build_mask_mapping(config, hidden, attention_mask, position_ids, mask_types)
    rotary = _position_embeddings(self, hidden, rotary_positions, types_here)
    # Dicts the layers of one forward share (Gemma 4's shared_kv_states): never across stages or steps.
    scratch = {name: {} for name in quirks.layer_scratch}
    for index, layer in layers:
        kind = _layer_type(config, index)
        layer_kwargs = {"attention_mask": masks[kind], "position_ids": position_ids, **scratch}
        layer_kwargs.update({kwarg: masks[mask_kind] for kwarg, mask_kind in quirks.layer_masks})
        if kind in rotary:
            layer_kwargs["position_embeddings"] = rotary[kind]
            if rotary[kind] is None and quirks.nope_attention_scaling:
                scale_fn = getattr(sys.modules[type(layer).__module__], quirks.nope_attention_scaling)
                layer_kwargs["attention_scaling"] = scale_fn(position_ids)
        if _accepts(layer.forward, "use_cache"):
            layer_kwargs["use_cache"] = False
        out = layer(hidden, **{k: v for k, v in layer_kwargs.items() if _accepts(layer.forward, k)})
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if deepstack is not None and index < len(deepstack):
            hidden = self._deepstack_process(hidden, visual_pos_masks, deepstack[index])  # the model's own merge
    for name in layout.after:
        module = getattr(self, name, None)
        if module is not None:
            hidden = module(hidden)
    if from_vlm:
        return BaseModelOutputWithPast(last_hidden_state=hidden)
    return hidden


def pipeline_causal_lm_forward(self: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                               causal_mask_mapping: dict[str, Any] | None = None,
                               multimodal_inputs: dict[str, torch.Tensor] | None = None,
                               multimodal_rows: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
    """Forward of a CausalLM (or VLM) stage: hidden states out, or logits when the stage holds the head.

    ``logits_to_keep``: an int ``k > 0`` keeps the last ``k`` positions, a
    tensor keeps those indices (as in Hugging Face); 0 keeps all.
    ``causal_mask_mapping`` goes to the decoder (see :func:`pipeline_decoder_forward`).
    A VLM's first stage also takes ``multimodal_inputs`` / ``multimodal_rows`` (its microbatch's images,
    grouped per sample by :func:`hf_pp.multimodal.multimodal_stage_inputs`) and runs the VLM's own forward.
    """
    _refuse_cache(kwargs)
    if self._hf_pp_layout.multimodal is not None:
        hidden = _multimodal_hidden(self, x, attention_mask, position_ids, causal_mask_mapping,
                                    stage_image_inputs(multimodal_inputs, multimodal_rows))
    else:
        hidden = _decoder_hidden(self, x, attention_mask, position_ids, causal_mask_mapping)
    layout: StageLayout = self._hf_pp_layout
    head = getattr(self, layout.head[0], None) if layout.head else None
    if head is None:
        return hidden
    if isinstance(logits_to_keep, int):
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:, :]
    else:
        hidden = hidden[:, logits_to_keep, :]
    logits = head(hidden)
    quirks = quirks_for(self.config)
    # A VLM's head reads its scalings from the text config (HyperCLOVAX-Vision's logits_scaling).
    config = self.config.get_text_config() if self._hf_pp_layout.multimodal is not None else self.config
    # A quirk attribute set to None means the model skips that scaling (CohereCompass' logit_scale).
    multiplier = getattr(config, quirks.logit_multiplier, None) if quirks.logit_multiplier else None
    if multiplier is not None:
        logits = logits * multiplier
    divisor = getattr(config, quirks.logit_divisor, None) if quirks.logit_divisor else None
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, quirks.final_softcap, None) if quirks.final_softcap else None
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    limit = getattr(config, quirks.logit_vocab_limit, None) if quirks.logit_vocab_limit else None
    if limit is not None and limit < logits.shape[-1]:
        logits = logits[..., :limit]
    return logits


def _multimodal_hidden(self: nn.Module, x: torch.Tensor, attention_mask, position_ids, causal_mask_mapping,
                       images: dict[str, torch.Tensor]) -> torch.Tensor:
    """A VLM stage: on the first, the VLM's own forward (images merged into the embeddings, then this stage's
    decoder layers); on the others, the decoder layers on the hidden states."""
    layout: StageLayout = self._hf_pp_layout
    position_ids = language_model_positions(position_ids)
    if causal_mask_mapping is not None:
        causal_mask_mapping = masks_from_transport(causal_mask_mapping)
    if x.is_floating_point():
        return _decoder_hidden(self, x, attention_mask, position_ids, causal_mask_mapping)
    inner = module_at(self, layout.multimodal.inner)
    mask = causal_mask_mapping if causal_mask_mapping is not None else attention_mask
    out = inner(input_ids=x, attention_mask=mask, position_ids=position_ids, use_cache=False, **images)
    return out[0]


def _decoder_hidden(self: nn.Module, x: torch.Tensor, attention_mask, position_ids, causal_mask_mapping) -> torch.Tensor:
    """The wrapper's decoder part of this stage: ``x`` through it, or ``x`` itself when the stage has none."""
    decoder = module_at(self, self._hf_pp_layout.prefix)
    if decoder is None:
        return x
    if causal_mask_mapping is not None:  # an unpatched decoder takes the mapping as its attention_mask
        attention_mask = causal_mask_mapping
    hidden = decoder(x, attention_mask=attention_mask, position_ids=position_ids)
    return hidden if isinstance(hidden, torch.Tensor) else hidden[0]  # [0]: an unpatched Hugging Face decoder


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per row, the position a sequence classifier reads: the rightmost token that is not padding.

    Hugging Face's rule (left or right padding); without a pad token, the last
    position. Computed on the whole batch before it is split, since only the
    first stage sees the token ids.

    Example:
        >>> last_token_index(torch.tensor([[5, 6, 0, 0], [0, 7, 8, 9]]), pad_token_id=0)
        tensor([1, 3])
    """
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def pipeline_sequence_classification_forward(
    self: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    last_token_index: torch.Tensor | None = None, causal_mask_mapping: dict[str, Any] | None = None, **kwargs: Any,
) -> torch.Tensor:
    """Forward of a ``*ForSequenceClassification`` stage: hidden states out, or, on the stage with
    ``score``, the pooled logits ``(batch, num_labels)`` at ``last_token_index`` (see :func:`last_token_index`)."""
    _refuse_cache(kwargs)
    hidden = _decoder_hidden(self, x, attention_mask, position_ids, causal_mask_mapping)
    if getattr(self, "score", None) is None:
        return hidden
    if last_token_index is None:
        raise PipelineConfigError("The stage with the classification head needs last_token_index (one position per row).")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    # Pool first: the head then runs on one position per row (the same numbers as scoring every position).
    return self.score(hidden[rows, last_token_index.to(hidden.device)])


def pipeline_token_classification_forward(
    self: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
    causal_mask_mapping: dict[str, Any] | None = None, **kwargs: Any,
) -> torch.Tensor:
    """Forward of a ``*ForTokenClassification`` stage: hidden states out, or, on the stage with the head's linear
    (``score`` or ``classifier``), the logits ``(batch, sequence, num_labels)`` of every position."""
    _refuse_cache(kwargs)
    hidden = _decoder_hidden(self, x, attention_mask, position_ids, causal_mask_mapping)
    head = [getattr(self, name, None) for name in self._hf_pp_layout.head]  # dropout, then the linear
    if head[-1] is None:
        return hidden
    for module in head:
        hidden = module(hidden)
    return hidden


def patch_hf_model_for_pp(module: nn.Module, *, patch_inner_model: bool = True, patch_causal_lm_model: bool = True) -> None:
    """Give a stage copy of a Hugging Face model tensor-in, tensor-out forwards (in place).

    ``patch_inner_model`` patches the decoder (``module.model`` of a
    ``...ForCausalLM``, else ``module`` itself); ``patch_causal_lm_model``
    patches the ``...ForCausalLM`` wrapper (only when there is one). Also
    turns ``use_cache`` off with a warning.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2, use_cache=False)
        >>> model = LlamaForCausalLM(cfg)
        >>> patch_hf_model_for_pp(model)
        >>> model(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 32])
    """
    layout = stage_layout(module)
    disable_cache_for_training(module)
    decoder = module_at(module, layout.prefix)
    if patch_inner_model and decoder is not None:
        decoder._hf_pp_layout = _decoder_view(layout)
        decoder.forward = types.MethodType(pipeline_decoder_forward, decoder)
    if patch_causal_lm_model and layout.prefix:
        module._hf_pp_layout = layout
        if is_sequence_classifier(module):
            forward = pipeline_sequence_classification_forward
        elif is_token_classifier(module):
            forward = pipeline_token_classification_forward
        else:
            forward = pipeline_causal_lm_forward
        module.forward = types.MethodType(forward, module)


def _decoder_view(layout: StageLayout) -> StageLayout:
    """The layout seen from the decoder itself (no prefix, no head)."""
    return StageLayout("", layout.before, layout.layers, layout.after, ())  # multimodal: None, the decoder alone
