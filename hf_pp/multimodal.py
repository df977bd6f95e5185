"""Vision-language models (image-text-to-text) across pipeline stages.

A ``*ForConditionalGeneration`` VLM is ``model`` (its own forward merges image
features into the token embeddings, then runs ``model.language_model``) and
``lm_head``. Split: the first stage holds the vision modules (tower, projector)
with the input embeddings and its decoder layers; later stages hold decoder
layers; the last one the norm and the head. On the first stage the VLM's own
forward runs, so every architecture merges its images its own way; its
language model is the patched decoder of :mod:`hf_pp.hf_patching`.

Everything a later stage needs from the token ids and the images is computed
once per batch, before the schedule, on every rank (:func:`multimodal_stage_inputs`):
the position ids (Qwen-VL's 3-D rotary positions from ``get_rope_index``) and
the attention masks the VLM builds (Gemma 3's bidirectional image blocks), read
from what the VLM's forward hands its language model. The image inputs are
regrouped by sample (:func:`pack_by_sample`) so the schedule's cut along dim 0
gives each microbatch exactly its own samples' images.

Example:
    >>> rows = torch.arange(6.).view(3, 2)        # three images, sample 0 has two, sample 1 none, sample 2 one
    >>> packed, counts = pack_by_sample(rows, [2, 0, 1])
    >>> packed.shape, counts.tolist()
    (torch.Size([3, 2, 2]), [2, 0, 1])
    >>> unpack_by_sample(packed[1:], counts[1:]).tolist()   # the microbatch of samples 1 and 2
    [[4.0, 5.0]]
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import PipelineConfigError
from .split import module_at

__all__ = [
    "MultimodalLayout", "PLACEHOLDERS", "LANGUAGE_MODEL_KWARGS_UNUSED", "PER_SAMPLE_IMAGE_INPUTS", "TOKENS_BY_PATCHES", "UNSUPPORTED_MULTIMODAL", "is_multimodal_config",
    "multimodal_layout", "multimodal_support_reason", "check_multimodal_split", "multimodal_stage_inputs",
    "pack_by_sample", "unpack_by_sample", "images_per_sample", "stage_image_inputs", "language_model_positions",
    "masks_from_transport",
]

# The multimodal_rows entry counting each sample's image and video placeholder tokens.
PLACEHOLDERS = "placeholder_tokens"

# Model types whose processors lay image inputs out per sample already ([batch, images, ...]).
PER_SAMPLE_IMAGE_INPUTS = frozenset({"idefics2", "idefics3", "smolvlm", "granite_docling"})

# Types whose image gives one placeholder token per group of patches (image_sizes // patch_size, then merged).
TOKENS_BY_PATCHES = frozenset({"mistral3", "mistral_large4", "lighton_ocr"})

# Image-text-to-text types hf_pp refuses, and why (filled from the sweep; each reason specific).
_HYPER_CONNECTIONS = (
    "its language model expands the embeddings into hc_mult residual streams before the decoder layers and "
    "mixes them back in hc_head, outside base_model_pp_plan; hf_pp passes one hidden-state tensor between stages "
    "and would skip both"
)
UNSUPPORTED_MULTIMODAL: dict[str, str] = {
    "glm5_next": _HYPER_CONNECTIONS,
    "hy_v4_vl": _HYPER_CONNECTIONS,
    "mistral_large4": (
        "its language model's rotary embedding holds a trained parameter (rotary_emb.alpha, LeRoPE scaling) "
        "that every decoder layer's positions depend on; hf_pp copies only parameter-free helpers to every stage "
        "and would have to share that parameter and sum its gradient across stages"
    ),
    "molmo2": (
        "its processor's image_token_pooling holds indices into the patches of the whole batch's crops (offset image "
        "by image), so a microbatch's rows would point at other samples' patches; hf_pp cuts tensors by sample but "
        "does not re-base indices"
    ),
    **dict.fromkeys(("minicpm_ocr", "minicpmv4_6", "minicpmv4_7"), (
        "its processor concatenates every image slice of the batch along the last dimension of one pixel_values "
        "row ([1, channels, patch, all patches]); hf_pp cuts image inputs into microbatches along dim 0"
    )),
    "ernie4_5_vl_moe": (
        "its forward hands the language model moe_mm_token_type_ids, which every MoE layer reads to route image "
        "tokens to the vision experts; hf_pp's later stages receive only hidden states, position ids and masks"
    ),
}

# Batch keys that are the text side; everything else a VLM batch carries goes to the first stage's VLM forward.
_TEXT_KEYS = frozenset({"input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "last_token_index"})

# What a VLM forward may hand its language model that carries nothing for a pipeline stage (no stage keeps a
# cache; the stage forward takes the embeddings, mask and positions as its own arguments).
LANGUAGE_MODEL_KWARGS_UNUSED = frozenset({
    "input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "cache_position",
})
# Language-model kwargs a VLM hands over that the patched decoder applies itself (Qwen3-VL's deepstack).
_LANGUAGE_MODEL_EXTRAS = frozenset({"visual_pos_masks", "deepstack_visual_embeds"})

# Image groups: pixel key, its grid key (Qwen-VL: one row per image), the keys with one row per image, and the
# placeholder token's config names.
_PIXEL_GROUPS = (
    ("pixel_values", "image_grid_thw", ("image_grid_thw", "image_sizes", "image_merge_sizes", "pixel_mask",
                                        "high_res_pixel_values"),
     ("image_token_id", "image_token_index")),
    ("pixel_values_videos", "video_grid_thw",
     ("video_grid_thw", "second_per_grid_ts", "video_sizes", "video_merge_sizes"),
     ("video_token_id", "video_token_index")),
)


@dataclasses.dataclass(frozen=True)
class MultimodalLayout:
    """Where a VLM keeps its parts, as attribute paths from the top model.

    ``inner``: the module whose forward merges images into embeddings (``"model"``);
    ``language_model``: the text decoder it calls (``"model.language_model"``);
    ``encoders``: the other children of ``inner`` (vision tower, projector, ...), all on the first stage.
    """

    inner: str
    language_model: str
    encoders: tuple[str, ...]


def is_multimodal_config(config: Any) -> bool:
    """Is this the config of a vision-language model (a ``vision_config`` beside its text config)?

    Example:
        >>> from transformers import LlavaConfig, LlamaConfig
        >>> is_multimodal_config(LlavaConfig()), is_multimodal_config(LlamaConfig())
        (True, False)
    """
    return getattr(config, "vision_config", None) is not None


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return None


def multimodal_support_reason(config: Any, plan_of) -> str | None:
    """Why hf_pp cannot split a VLM of this config, or None when it can (``plan_of`` reads a text plan)."""
    name = type(config).__name__
    for sub in ("audio_config", "speech_config"):
        if getattr(config, sub, None) is not None:
            return (f"{name} also takes audio ({sub}); hf_pp pipelines text and vision-language models. "
                    "Load its text-only *ForCausalLM, or pass module_fqns_per_model_part and your own stage forward.")
    model_type = getattr(config, "model_type", "")
    if model_type in UNSUPPORTED_MULTIMODAL:
        return f"{name}: {UNSUPPORTED_MULTIMODAL[model_type]}"
    text = _text_config(config)
    if text is None or text is config:
        return f"{name} has a vision_config but no single text config; hf_pp cannot tell which decoder to split."
    from .architectures import UNSUPPORTED

    if getattr(text, "model_type", "") in UNSUPPORTED:  # its language model is refused as a causal LM too
        return f"{name}'s language model ({text.model_type}): {UNSUPPORTED[text.model_type]}"
    if plan_of(text) is None:
        return (f"{name}'s language model ({getattr(text, 'model_type', '?')}) has no base_model_pp_plan and hf_pp has "
                "no plan of its own for it; pass module_fqns_per_model_part and patch_*=False.")
    return None


def multimodal_layout(model: nn.Module, layers_name: str) -> MultimodalLayout:
    """The :class:`MultimodalLayout` of a VLM (whole or a stage copy; meta is fine).

    The language model is the one child of ``model.<base_model_prefix>`` holding the decoder layer container
    ``layers_name``; a VLM built otherwise is refused with what was found.

    Example:
        >>> from transformers import LlavaConfig, LlavaForConditionalGeneration
        >>> with torch.device("meta"):
        ...     vlm = LlavaForConditionalGeneration(LlavaConfig())
        >>> multimodal_layout(vlm, "layers")
        MultimodalLayout(inner='model', language_model='model.language_model', encoders=('model.vision_tower', 'model.multi_modal_projector'))
    """
    base = getattr(model, "base_model_prefix", "") or ""
    inner = model._modules.get(base) if base else None
    name = type(model).__name__
    if inner is None:
        raise PipelineConfigError(f"{name}: hf_pp expects the VLM's vision and language parts under "
                                  f"`{name}.{base or 'model'}`; it has {list(model._modules)}.")
    extra = [child for child in model._modules if child not in (base, "lm_head")]
    if extra:
        raise PipelineConfigError(f"{name} has modules {extra} beside `{base}` and `lm_head`; hf_pp does not know on "
                                  "which stage they run. Pass module_fqns_per_model_part and your own stage forward.")
    # A stage copy with no decoder layers (pp_balance may leave the vision stage none) keeps the container's slot, None.
    candidates = [child for child, module in inner._modules.items() if module is not None and (
        isinstance(getattr(module, layers_name, None), nn.Module) or module._modules.get(layers_name, 0) is None)]
    if len(candidates) > 1:  # a vision encoder may have `layers` too: the language model has the text config
        text_type = getattr(_text_config(model.config), "model_type", None)
        candidates = [c for c in candidates if getattr(getattr(inner._modules[c], "config", None), "model_type", None)
                      == text_type]
    if len(candidates) != 1:
        raise PipelineConfigError(f"{name}: found {len(candidates)} language models (children of `{base}` with "
                                  f"`{layers_name}`: {candidates}); hf_pp splits VLMs with exactly one.")
    language_model = candidates[0]
    # Everything else of the VLM runs with the image merge: its other children and its own parameters
    # (LlavaNext's image_newline).
    encoders = tuple(f"{base}.{child}" for child in inner._modules if child != language_model)
    encoders += tuple(f"{base}.{name}" for name in inner._parameters)
    return MultimodalLayout(base, f"{base}.{language_model}", encoders)


def check_multimodal_split(model: nn.Module, layout: MultimodalLayout, embeddings: Sequence[str],
                           fqns_per_stage: Sequence[Sequence[str]]) -> None:
    """Refuse a split that puts the vision modules anywhere but the stage with the input embeddings (the first),
    or that puts a decoder layer the VLM feeds image features into (Qwen3-VL's deepstack) after the first stage."""
    def owner(fqn: str) -> int | None:
        return next((s for s, fqns in enumerate(fqns_per_stage)
                     if any(fqn == f or fqn.startswith(f + ".") or f.startswith(fqn + ".") for f in fqns)), None)

    encoder_stages = {s for fqn in layout.encoders if (s := owner(fqn)) is not None}
    embedding_stages = {s for fqn in embeddings if (s := owner(fqn)) is not None}
    if encoder_stages - {0} or embedding_stages - {0}:
        raise PipelineConfigError(
            f"{type(model).__name__}: the vision modules {list(layout.encoders)} and the input embeddings produce the "
            f"image features the first stage merges into the tokens; the plan puts them on stages "
            f"{sorted(encoder_stages | embedding_stages)}. List them on stage 0 (module_fqns_per_model_part)."
        )
    deepstack = len(getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None) or ())
    if deepstack:
        late = [i for i in range(deepstack) if owner(f"{layout.language_model}.layers.{i}") not in (0, None)]
        if late:
            raise PipelineConfigError(
                f"{type(model).__name__} adds image features into decoder layers 0-{deepstack - 1} "
                f"(vision_config.deepstack_visual_indexes has {deepstack}); layers {late} would be on a later stage. "
                f"Put at least {deepstack} layers on the first stage (module_fqns_per_model_part or pp_layers_per_stage)."
            )


def _token_id(config: Any, names: Sequence[str]) -> int | None:
    for source in (config, _text_config(config)):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    return None


def pack_by_sample(rows: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (samples' rows one after another) as ``[samples, max count, ...]`` zero-padded, and the counts."""
    width = max(counts, default=0)
    packed = rows.new_zeros(len(counts), width, *rows.shape[1:])
    start = 0
    for sample, count in enumerate(counts):
        packed[sample, :count] = rows[start:start + count]
        start += count
    return packed, torch.tensor(list(counts), dtype=torch.long, device=rows.device)


def unpack_by_sample(packed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The rows of these samples, one after another (the inverse of :func:`pack_by_sample`)."""
    return torch.cat([packed[sample, :count] for sample, count in enumerate(counts.tolist())])


def images_per_sample(weights: Sequence[int], tokens_per_sample: Sequence[int], *, kind: str = "image") -> list[int]:
    """How many of the batch's images (in order) belong to each sample.

    ``weights``: each image's share of the placeholder tokens (its grid's patches, or 1 when every image gives
    the same number); the batch's placeholder total fixes the tokens per unit of weight. Each sample takes
    images in order until its own placeholder count is reached exactly; a sample it does not fit is named.

    Example:
        >>> images_per_sample([1, 1, 1], [8, 0, 4])
        [2, 0, 1]
        >>> images_per_sample([64, 16], [4, 16])
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: Sample 0 of the batch has 4 image placeholder tokens, but its images in order give 16; the pixel inputs do not match the image tokens. Check that the processor built input_ids and the pixel values from the same images.
    """
    hint = "Check that the processor built input_ids and the pixel values from the same images."
    total_tokens, total_weight = sum(tokens_per_sample), sum(weights)
    if total_weight == 0:
        if total_tokens:
            raise PipelineConfigError(f"The batch has {total_tokens} {kind} placeholder tokens but no {kind}s. {hint}")
        return [0] * len(tokens_per_sample)
    ratio = Fraction(total_tokens, total_weight)
    tokens_of = [w * ratio for w in weights]
    if any(t.denominator != 1 for t in tokens_of):
        raise PipelineConfigError(
            f"The batch has {total_tokens} {kind} placeholder tokens (per sample: {list(tokens_per_sample)}), which "
            f"its {len(weights)} {kind}s cannot share out; the pixel inputs do not match the image tokens. {hint}"
        )
    counts, image = [], 0
    for sample, tokens in enumerate(tokens_per_sample):
        taken, given = 0, 0
        while given < tokens and image < len(weights):
            given += int(tokens_of[image])
            image, taken = image + 1, taken + 1
        if given != tokens:
            raise PipelineConfigError(
                f"Sample {sample} of the batch has {tokens} {kind} placeholder tokens, but its {kind}s in order give "
                f"{given}; the pixel inputs do not match the image tokens. {hint}"
            )
        counts.append(taken)
    return counts


def _image_weights(config: Any, batch: dict[str, Any], pixel_key: str, images: int,
                   placeholders: torch.Tensor) -> list[int]:
    """Each image's share of the placeholder tokens, for pixel inputs with one row per image and no grid.

    Images of one size give the same number of tokens. Of different sizes (``image_sizes``): each maximal run of
    placeholders is one image when there are as many runs as images; else, for the types whose token count is the
    image's patch count (:data:`TOKENS_BY_PATCHES`), those patches; else the batch is refused.
    """
    sizes = batch.get("image_sizes")
    if pixel_key != "pixel_values" or not torch.is_tensor(sizes) or not (sizes != sizes[:1]).any():
        return [1] * images
    starts = placeholders & ~torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
    if int(starts.sum()) == images:
        lengths = []
        for row, row_starts in zip(placeholders, starts):
            for start in row_starts.nonzero().flatten().tolist():
                end = start
                while end < row.shape[0] and row[end]:
                    end += 1
                lengths.append(end - start)
        return lengths
    patch = getattr(getattr(config, "vision_config", None), "patch_size", None)
    if getattr(config, "model_type", "") in TOKENS_BY_PATCHES and patch:
        return [(int(h) // patch) * (int(w) // patch) for h, w in sizes.tolist()]
    raise PipelineConfigError(
        "The batch's images have different image_sizes and their image tokens are not one run per image; hf_pp "
        f"cannot tell how many tokens each image of {type(config).__name__} gives, so not which sample it belongs "
        "to. Resize the images to one size in the processor, or batch images of one size."
    )


def _group_by_sample(model_type: str, config: Any, batch: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """``{key: (packed, counts)}`` for every image input that is not per sample already; ``{key: tensor}`` else."""
    ids = batch["input_ids"]
    samples = ids.shape[0]
    out: dict[str, Any] = {}
    left = list(keys)
    units_of: dict[str, tuple[int, list[int]]] = {}  # pixel key -> (images, images per sample)
    for pixel_key, grid_key, per_image_keys, token_names in _PIXEL_GROUPS:
        pixels = batch.get(pixel_key)
        if not torch.is_tensor(pixels):
            continue
        if model_type in PER_SAMPLE_IMAGE_INPUTS and pixels.shape[0] == samples:
            continue  # already [batch, images, ...]: handled with the per-sample keys below
        token = _token_id(config, token_names)
        kind = "video" if "video" in pixel_key else "image"
        if token is None:
            raise PipelineConfigError(f"{type(config).__name__} gives {pixel_key} but names no placeholder token "
                                      f"({' / '.join(token_names)}); hf_pp cannot tell which sample an image is for.")
        tokens = (ids == token).sum(-1).tolist()
        grid = batch.get(grid_key)
        if torch.is_tensor(grid):
            patches = grid.prod(-1).tolist()  # rows of the pixel tensor per image
            per_sample = images_per_sample(patches, tokens, kind=kind)
            rows, start = [], 0
            for n in per_sample:
                rows.append(sum(patches[start:start + n]))
                start += n
        else:
            weights = _image_weights(config, batch, pixel_key, pixels.shape[0], ids == token)
            per_sample = rows = images_per_sample(weights, tokens, kind=kind)
        out[pixel_key] = pack_by_sample(pixels, rows)
        left.remove(pixel_key)
        units_of[pixel_key] = (sum(per_sample), per_sample)
        for key in per_image_keys:  # one row per image: grids, image sizes, frame timings
            if key in left:
                out[key] = pack_by_sample(batch[key], per_sample)
                left.remove(key)
    for key in left:
        value = batch[key]
        by_sample = value.dim() > 0 and value.shape[0] == samples
        token_aligned = value.dim() >= 2 and value.shape[:2] == ids.shape
        groups = [g for g, (units, _) in units_of.items() if value.dim() > 0 and value.shape[0] == units]
        if token_aligned or (by_sample and not groups):
            out[key] = value
        elif len(groups) == 1 and not by_sample:
            out[key] = pack_by_sample(value, units_of[groups[0]][1])
        else:
            raise PipelineConfigError(
                f"The batch's {key!r} has shape {tuple(value.shape)}: hf_pp cannot tell whether it has one row per "
                "sample or one per image, so it cannot cut it into microbatches. Drop it from the batch "
                "(remove_unused_columns) or give it per sample."
            )
    return out


class _LanguageModelInputs(Exception):
    """Raised by the stand-in language model with what the VLM's forward handed it."""

    def __init__(self, kwargs: dict[str, Any]):
        super().__init__("captured")
        self.kwargs = kwargs


class _ZeroEmbedding(nn.Module):
    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size, self.dtype = hidden_size, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype, device=input_ids.device)


class _LanguageModelStandIn(nn.Module):
    """Takes the language model's place while the VLM's forward computes positions and masks: embeds to zeros
    (no embedding weights are needed on this rank) and stops the forward where the decoder would start."""

    def __init__(self, original: nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embed_tokens = _ZeroEmbedding(hidden_size, dtype)
        # Forwards read `self.device` from their first parameter; a stage may have none left in the VLM.
        self.device_anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        object.__setattr__(self, "_original", original)  # not a submodule: only read for its attributes

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)  # config, gradient_checkpointing, ...

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, *args: Any, **kwargs: Any):
        raise _LanguageModelInputs(kwargs)


def _language_model_inputs(part: nn.Module, layout: MultimodalLayout, batch: dict[str, Any]) -> dict[str, Any]:
    """What the VLM's forward hands its language model for this batch, without the images' pixels."""
    inner = module_at(part, layout.inner)
    owner_path, _, child = layout.language_model.rpartition(".")
    owner = module_at(part, owner_path)
    text = _text_config(part.config)
    first = next((p for p in part.parameters() if p.is_floating_point()), None)
    dtype, device = (first.dtype, first.device) if first is not None else (torch.float32, batch["input_ids"].device)
    original = owner._modules[child]
    owner._modules[child] = _LanguageModelStandIn(original, text.hidden_size, dtype, device)
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "last_token_index")
              and not k.startswith("pixel_values")}
    try:
        with torch.no_grad():
            inner(**kwargs)
    except _LanguageModelInputs as captured:
        return captured.kwargs
    finally:
        owner._modules[child] = original
    raise PipelineConfigError(f"{type(part).__name__}'s forward never called its language model; hf_pp cannot split it.")


def _mask_for_transport(mask: Any, samples: int) -> Any:
    """A mask entry the schedule can cut along dim 0: ``None`` (no mask needed) travels as an empty tensor."""
    return torch.zeros(samples, 0) if mask is None else mask


def masks_from_transport(mapping: dict[str, Any]) -> dict[str, Any]:
    """The masks of :func:`multimodal_stage_inputs`' ``causal_mask_mapping`` as the layers take them."""
    return {k: None if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == 0 else v for k, v in mapping.items()}


def multimodal_stage_inputs(part: nn.Module, layout: MultimodalLayout, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's stage kwargs for a VLM: computed once, before the schedule, identical on every rank.

    Returns ``position_ids`` (3-D ones batch-first, ``[batch, sections, seq]``), either ``attention_mask``
    or the ``causal_mask_mapping`` the VLM builds, ``multimodal_inputs`` (the first stage's image inputs,
    regrouped per sample) and ``multimodal_rows`` (how many rows of each regrouped input a sample has).
    """
    ids = batch["input_ids"]
    samples = ids.shape[0]
    handed = _language_model_inputs(part, layout, batch)
    unknown = sorted(k for k, v in handed.items() if v is not None and k not in LANGUAGE_MODEL_KWARGS_UNUSED
                     and k not in _LANGUAGE_MODEL_EXTRAS)
    if unknown:
        raise PipelineConfigError(
            f"{type(part).__name__}'s forward hands its language model {unknown}, which a pipeline stage does not "
            "carry; hf_pp cannot split this model without changing its results."
        )
    out: dict[str, Any] = {}
    positions = handed.get("position_ids")
    if torch.is_tensor(positions):
        if positions.dim() == 3:  # [sections, batch, seq]: the schedule cuts dim 0
            positions = positions.transpose(0, 1)
        out["position_ids"] = positions.expand(samples, *positions.shape[1:]) if positions.shape[0] == 1 else positions
    mask = handed.get("attention_mask")
    if isinstance(mask, dict):
        out["causal_mask_mapping"] = {k: _mask_for_transport(v, samples) for k, v in mask.items()}
    elif torch.is_tensor(mask):
        out["attention_mask"] = mask
    image_keys = [k for k, v in batch.items() if k not in _TEXT_KEYS and torch.is_tensor(v)]
    grouped = _group_by_sample(getattr(part.config, "model_type", ""), part.config, batch, image_keys)
    out["multimodal_inputs"] = {k: v[0] if isinstance(v, tuple) else v for k, v in grouped.items()}
    out["multimodal_rows"] = {k: v[1] for k, v in grouped.items() if isinstance(v, tuple)}
    tokens = [t for names in (g[3] for g in _PIXEL_GROUPS) if (t := _token_id(part.config, names)) is not None]
    out["multimodal_rows"][PLACEHOLDERS] = sum((ids == t).sum(-1) for t in tokens) if tokens else ids.new_ones(samples)
    return out


def stage_image_inputs(multimodal_inputs: dict[str, torch.Tensor] | None,
                       multimodal_rows: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """One microbatch's image inputs in the processor's layout again (rows of its samples, in order)."""
    if not multimodal_inputs:
        return {}
    rows = multimodal_rows or {}
    # A microbatch without placeholder tokens runs text only, as a batch without images does (no pixel inputs).
    no_images = PLACEHOLDERS in rows and int(rows[PLACEHOLDERS].sum()) == 0
    out = {}
    for key, value in multimodal_inputs.items():
        if key in rows:
            value = unpack_by_sample(value, rows[key])
            if value.shape[0] == 0:
                continue
        elif no_images and key.startswith("pixel_"):
            continue
        out[key] = value
    return out


def language_model_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Batch-first 3-D position ids back in the ``[sections, batch, seq]`` layout the language model takes."""
    if torch.is_tensor(position_ids) and position_ids.dim() == 3:
        return position_ids.transpose(0, 1)
    return position_ids
