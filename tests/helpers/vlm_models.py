"""Tiny image-text-to-text models (VLMs) and the batches their processors would give (issue 24).

``VLM_CASES[model_type](with_images=True)`` returns ``(model, batch)``: the ``*ForConditionalGeneration``
class of ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` built from a shrunk config (random weights, fp32,
eager attention, train mode, no dropout), and 4 right-padded samples -- one with one image, one without,
one with two images (one where the model takes a single image per sample), one with one -- whose image
inputs have the processor's layout. Each case also records where the vision tower, projector and language
model live and how its image rows are laid out (:class:`VLMCase`). :func:`unbuilt_vlm_types` names every
other image-text-to-text type with the reason it has no case.

The number of placeholder tokens per image is what the model's own ``get_image_features`` returns for the
pixels, and the special tokens around them are those the processor's prompt holds
(``processing_<type>.py``). Labels are -100 on padding and on every token of an image's span.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import transformers
from helpers.hf_models import tiny_config

__all__ = ["VLMCase", "VLM_CASES", "unbuilt_vlm_types", "tiny_vlm_config", "VOCAB", "TEXT_IDS", "SPECIAL_IDS"]

VOCAB, HIDDEN = 256, 32
# Plain text tokens are drawn from TEXT_IDS; every special id (image, video, boi/eoi, vision start/end...) is
# moved into SPECIAL_IDS so text never collides with it.
TEXT_IDS = range(3, VOCAB - 32)
SPECIAL_IDS = range(VOCAB - 32, VOCAB)
PAD, BOS = 0, 1
TEXT_LENGTHS = (6, 9, 5, 7)
IMAGES_PER_SAMPLE = (1, 0, 2, 1)
_KEEP_IDS = {"pad_token_id", "bos_token_id", "eos_token_id"}

# Set on a vision config only where it has the attribute.
_VISION = dict(
    hidden_size=HIDDEN, embed_dim=HIDDEN, intermediate_size=64, num_hidden_layers=2, depth=2, num_layers=2,
    num_attention_heads=2, num_heads=2, num_key_value_heads=2, head_dim=16, image_size=16, patch_size=4,
    projection_dim=HIDDEN, out_hidden_size=HIDDEN, use_cache=False,
)


def _zero_dropout(values: dict) -> dict:
    return {k: 0.0 if isinstance(v, float) and ("dropout" in k or "pdrop" in k) else v for k, v in values.items()}


def _shrunk(sub: dict, sizes: dict) -> dict:
    return _zero_dropout({**sub, **{k: v for k, v in sizes.items() if k in sub}})


def _special_ids(config: dict) -> dict:
    """Each special token id of ``config`` (top level, also lists of ids) given its own id in SPECIAL_IDS."""
    free = iter(reversed(SPECIAL_IDS))
    moved = {}
    for key, value in sorted(config.items()):
        if key in _KEEP_IDS or not key.endswith(("_token_id", "_token_index", "_token_ids")):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            moved[key] = next(free)
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            moved[key] = [next(free) for _ in value]
    return moved


def _set_eager(config) -> None:
    config._attn_implementation = "eager"
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            _set_eager(sub)


def tiny_vlm_config(model_type: str, text: dict | None = None, vision: dict | None = None,
                    subs: dict[str, dict] | None = None, **top):
    """``model_type``'s default config with a 4-layer :func:`tiny_config` text model and a 2-layer vision
    tower (:data:`_VISION`), its special token ids moved into SPECIAL_IDS. ``text``, ``vision`` and ``top``
    override entries of the text config, the vision config and the top level; ``subs`` those of other
    sub-configs (a resampler, a VQ model), which are shrunk as the vision config is."""
    cls = CONFIG_MAPPING[model_type]
    default = cls().to_dict()
    overrides = {"vision_config": vision or {}, **{k: v for k, v in (subs or {}).items()}}
    kwargs = {k: v for k, v in default.items() if k != "text_config"}
    kwargs.update(_special_ids(default), tie_word_embeddings=False, use_cache=False)
    kwargs.update({k: v for k, v in dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2).items() if k in default})
    kwargs = _shrunk(kwargs, dict(vocab_size=VOCAB, hidden_size=HIDDEN, projection_dim=HIDDEN))
    for key in cls.sub_configs:
        if key != "text_config" and isinstance(default.get(key), dict):
            kwargs[key] = {**_shrunk(default[key], _VISION), **overrides.get(key, {})}
    if "text_config" in default:
        text_type = default["text_config"]["model_type"]
        text = dict(text or {})
        if "rope_parameters" in default["text_config"]:  # the model's rope (partial rotary...), with text's entries
            text["rope_parameters"] = {**default["text_config"]["rope_parameters"], **text.get("rope_parameters", {})}
        text_cfg = tiny_config(text_type, vocab_size=VOCAB, tie_word_embeddings=False, **text)
        kwargs["text_config"] = text_cfg.to_dict()
    kwargs.update(top)
    config = cls(**kwargs)
    _set_eager(config)
    return config


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


@dataclass(frozen=True)
class VLMCase:
    """How to build one model type's tiny VLM and batch, and where its parts are.

    ``vision_tower``, ``projector`` and ``language_model`` are attribute paths from the
    ``*ForConditionalGeneration`` model. ``layout`` says how the image inputs' rows map to samples:
    ``"per_image"`` (dim 0 is the images of the batch, in order), ``"per_sample"`` (dim 0 is the sample,
    dim 1 its images, padded) or ``"grid"`` (dim 0 is patches of all images, ``grid_key[i].prod()`` rows
    for image i). ``images(config, counts, g)`` gives the image inputs (``counts[i]`` images for sample i, drawn
    from the generator ``g``); ``span(config, n, inputs, index)`` the prompt's token ids for image
    ``index`` of those inputs, which has ``n`` placeholders.
    """

    model_type: str
    images: Callable[..., dict]
    span: Callable[..., list[int]]
    config: dict = field(default_factory=dict)
    vision_tower: str = "model.vision_tower"
    projector: str | None = "model.multi_modal_projector"
    language_model: str = "model.language_model"
    layout: str = "per_image"
    grid_key: str | None = None
    multi_image: bool = True
    images_before_bos: bool = False  # PaliGemma's prompt: image tokens, then bos and the text
    extra: Callable[..., None] | None = None  # adds the processor's other token-level keys to the batch

    def model(self, seed: int = 0) -> torch.nn.Module:
        """The tiny model, identically initialised for a seed."""
        torch.manual_seed(seed)
        config = tiny_vlm_config(self.model_type, **copy.deepcopy(self.config))  # configs edit what they get
        model = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[self.model_type])(config)
        _fill_zero_matrices(model)
        return model.float().train()

    def batch(self, model, with_images: bool = True, seed: int = 0) -> dict:
        """4 samples for ``model`` (the same text with or without the images)."""
        return _batch(self, model, with_images, seed)

    def __call__(self, with_images: bool = True, seed: int = 0):
        model = self.model(seed)
        return model, self.batch(model, with_images, seed)


def _image_counts(case: VLMCase) -> list[int]:
    counts = list(IMAGES_PER_SAMPLE)
    if not case.multi_image:
        counts = [min(c, 1) for c in counts]
    return counts


def _tokens_per_image(model, image_inputs: dict, case: VLMCase, n_images: int) -> list[int]:
    """Placeholder tokens per image: the lengths of the model's own image features for these pixels."""
    fn = model.model.get_image_features
    names = inspect.signature(fn).parameters
    with torch.no_grad():
        out = fn(**{k: v for k, v in image_inputs.items() if k in names})
    feats = getattr(out, "pooler_output", out)
    if case.layout == "per_sample":  # one entry per sample, holding all its images
        counts = [c for c in _image_counts(case) if c]
        return [len(f) // c for f, c in zip([f for f in feats if len(f)], counts) for _ in range(c)]
    if isinstance(feats, (list, tuple)):
        return [len(f) for f in feats]
    if feats.dim() == 3:
        return [feats.shape[1]] * feats.shape[0]
    if case.grid_key is not None:  # one row per token for the whole batch: share it out by grid size
        sizes = image_inputs[case.grid_key].prod(-1)
        return (sizes * feats.shape[0] // sizes.sum()).tolist()
    return [feats.shape[0] // n_images] * n_images


def _fill_zero_matrices(model) -> None:
    """Random-initialise weight matrices that the model's init leaves at zero (Gemma 3's
    ``mm_input_projection_weight``): a zero projector would cut the vision tower off from the loss."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(std=0.02)


def _batch(case: VLMCase, model, with_images: bool, seed: int) -> dict:
    config = model.config
    counts = _image_counts(case) if with_images else [0] * len(TEXT_LENGTHS)
    image_inputs = case.images(config, counts, torch.Generator().manual_seed(seed + 1)) if with_images else {}
    per_image = iter(_tokens_per_image(model, image_inputs, case, sum(counts)) if with_images else [])
    g = torch.Generator().manual_seed(seed + 2)
    rows, image_rows, k = [], [], 0
    for length, count in zip(TEXT_LENGTHS, counts):
        text = torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (length,), generator=g).tolist()
        spans = []
        for _ in range(count):
            spans += case.span(config, next(per_image), image_inputs, k)
            k += 1
        head, flags = ([*spans, BOS], [True] * len(spans) + [False]) if case.images_before_bos else \
            ([BOS, *spans], [False] + [True] * len(spans))
        rows.append(head + text)
        image_rows.append(flags + [False] * length)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    in_span = torch.zeros(len(rows), width, dtype=torch.bool)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, span) in enumerate(zip(rows, image_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        in_span[i, : len(ids)] = torch.tensor(span)
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | in_span, -100)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **image_inputs)
    if case.extra is not None:
        case.extra(config, batch)
    return batch


# ---- image inputs, one function per processor layout ----

def _pixels(config, n: int, g, height=None, width=None) -> torch.Tensor:
    vision = config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    return torch.randn(n, vision.num_channels, height or size, width or size, generator=g)


def _square_images(config, counts, g) -> dict:
    return {"pixel_values": _pixels(config, sum(counts), g)}


def _sam_images(config, counts, g) -> dict:
    """Square images at the SAM encoder's size (UnlimitedOCR's global view)."""
    size = config.vision_config.sam_config.image_size
    return {"pixel_values": torch.randn(sum(counts), 3, size, size, generator=g)}


def _masked_images(config, counts, g) -> dict:
    """Square images with the processor's ``pixel_mask`` (one ``[H, W]`` row per image, Aria), the right quarter
    padding."""
    pixels = _pixels(config, sum(counts), g)
    mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
    mask[..., -pixels.shape[-1] // 4:] = 0
    return {"pixel_values": pixels.masked_fill(mask[:, None] == 0, 0.0), "pixel_mask": mask}


def _hybrid_images(config, counts, g) -> dict:
    """DeepSeek-VL-Hybrid: each image at the low-res tower's size and again at the SAM tower's."""
    size = config.high_res_vision_config.image_size
    return {"pixel_values": _pixels(config, sum(counts), g),
            "high_res_pixel_values": torch.randn(sum(counts), 3, size, size, generator=g)}


def _image_token(config) -> int:
    return getattr(config, "image_token_id", None) or config.image_token_index


def _ovis2_span(config, n: int, *_) -> list[int]:
    indicators = config.visual_indicator_token_ids
    return [indicators[0]] + [_image_token(config)] * n + [indicators[-1]]


# Siglip2 (LFM2-VL): each image as rows of flattened patches padded to the most patches, spatial_shapes its
# (rows, cols) in patches (multiples of the downsample factor), pixel_attention_mask its real patches.
_PATCH_SHAPES = ((4, 4), (2, 4), (4, 2))


def _patch_images(config, counts, g) -> dict:
    vision = config.vision_config
    shapes = torch.tensor([_PATCH_SHAPES[i % len(_PATCH_SHAPES)] for i in range(sum(counts))])
    pixels = torch.zeros(len(shapes), vision.num_patches, vision.num_channels * vision.patch_size**2)
    mask = torch.zeros(pixels.shape[:2], dtype=torch.bool)
    for i, n in enumerate(shapes.prod(-1).tolist()):
        pixels[i, :n] = torch.randn(n, pixels.shape[-1], generator=g)
        mask[i, :n] = True
    return {"pixel_values": pixels, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def _wrapped(before=(), after=()) -> Callable[..., list[int]]:
    """A span function: ``before``, the n image tokens, ``after``; entries are ids or config attribute names."""
    def span(config, n: int, *_) -> list[int]:
        ids = lambda names: [getattr(config, x) if isinstance(x, str) else x for x in names]  # noqa: E731
        return ids(before) + [_image_token(config)] * n + ids(after)
    return span


def _image_types(key: str) -> Callable[..., None]:
    """The processor's ``mm_token_type_ids`` (1 on image tokens, 2 on video tokens), under ``key``."""
    def add(config, batch):
        ids = batch["input_ids"]
        types = (ids == _image_token(config)).long()
        video = getattr(config, "video_token_id", None)
        if video is not None:
            types = types.masked_fill(ids == video, 2)
        batch[key] = types
    return add


# LlavaNext: each image is a base view plus the crops of its best-fitting pinpoint resolution, padded
# to the batch's most crops; image_sizes are the original sizes.
_NEXT_SIZES = ((16, 32), (32, 32), (32, 16), (16, 16))


def _anyres_images(config, counts, g) -> dict:
    from transformers.image_processing_utils import select_best_resolution

    size = config.vision_config.image_size
    sizes = [_NEXT_SIZES[i % len(_NEXT_SIZES)] for i in range(sum(counts))]
    crops = [h * w // size**2 + 1 for h, w in (select_best_resolution(s, config.image_grid_pinpoints) for s in sizes)]
    pixels = torch.zeros(len(sizes), max(crops), config.vision_config.num_channels, size, size)
    for i, n in enumerate(crops):
        pixels[i, :n] = torch.randn(n, *pixels.shape[2:], generator=g)
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


# Pixtral (Mistral 3): images padded to the batch's largest, image_sizes their real sizes; the prompt has
# one row of [IMG] per merged patch row, each ended by [IMG_BREAK], the last by [IMG_END].
_PIXTRAL_SIZES = ((16, 16), (16, 8), (8, 16))
# Tokens the tokenizer has but the config does not name get the low end of SPECIAL_IDS (the config's
# own ids take the top).
_IMG_BREAK, _IMG_END, _IMG_START, _GLOBAL_IMG = SPECIAL_IDS[:4]


def _pixtral_images(config, counts, g) -> dict:
    sizes = [_PIXTRAL_SIZES[i % len(_PIXTRAL_SIZES)] for i in range(sum(counts))]
    pixels = torch.zeros(len(sizes), config.vision_config.num_channels, 16, 16)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(pixels.shape[1], h, w, generator=g)
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def _pixtral_span(config, n: int, inputs: dict, index: int) -> list[int]:
    rows = int(inputs["image_sizes"][index][0]) // config.vision_config.patch_size // config.spatial_merge_size
    lines = [[_image_token(config)] * (n // rows) + [_IMG_BREAK] for _ in range(rows)]
    lines[-1][-1] = _IMG_END
    return sum(lines, [])


def _paligemma_extra(config, batch) -> None:
    """token_type_ids 0 on the prefix (images, bos, a 3-token prompt), 1 on the suffix; labels only on the
    suffix, as the processor gives them for a prompt with a suffix."""
    ids = batch["input_ids"]
    prefix_len = (ids == _image_token(config)).sum(-1, keepdim=True) + 4
    batch["token_type_ids"] = (torch.arange(ids.shape[1]) >= prefix_len).long() * batch["attention_mask"]
    batch["labels"] = batch["labels"].masked_fill(batch["token_type_ids"] == 0, -100)


def _idefics_images(config, counts, g) -> dict:
    """One unsplit image per entry, zero images padding each sample to the batch's most images."""
    vision = config.vision_config
    pixels = torch.zeros(len(counts), max(counts), vision.num_channels, vision.image_size, vision.image_size)
    mask = torch.zeros(pixels.shape[:2] + pixels.shape[3:], dtype=torch.bool)
    for i, count in enumerate(counts):
        pixels[i, :count] = torch.randn(count, *pixels.shape[2:], generator=g)
        mask[i, :count] = True
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def _tile_images(config, counts, g) -> dict:
    """Idefics3's layout with GraniteDocling's mask: one flag per image slot (``[B, max_images]``)."""
    inputs = _idefics_images(config, counts, g)
    inputs["pixel_attention_mask"] = inputs["pixel_attention_mask"].flatten(2).any(-1)
    return inputs


# Qwen-VL: patches of all images in one [total_patches, C * temporal_patch * patch**2] tensor, a (t, h, w)
# row per image in image_grid_thw (h, w in patches, multiples of the merge size); the prompt puts each
# image's tokens between vision_start and vision_end (get_rope_index finds images by vision_start).
_GRIDS = ((1, 4, 4), (1, 2, 4), (1, 4, 2))


def _grid_images(config, counts, g) -> dict:
    vision = config.vision_config
    grids = torch.tensor([_GRIDS[i % len(_GRIDS)] for i in range(sum(counts))])
    channels = getattr(vision, "in_channels", None) or vision.num_channels
    dim = channels * getattr(vision, "temporal_patch_size", 1) * vision.patch_size**2
    return {"pixel_values": torch.randn(int(grids.prod(-1).sum()), dim, generator=g), "image_grid_thw": grids}


def _grid_patch_images(config, counts, g) -> dict:
    """Qwen-VL's grid layout with each patch as an image (``[total_patches, C, patch, patch]``, PaddleOCR-VL)."""
    vision = config.vision_config
    grids = torch.tensor([_GRIDS[i % len(_GRIDS)] for i in range(sum(counts))])
    shape = (int(grids.prod(-1).sum()), getattr(vision, "num_channels", 3), vision.patch_size, vision.patch_size)
    return {"pixel_values": torch.randn(*shape, generator=g), "image_grid_thw": grids}


def _merged_grid_images(config, counts, g) -> dict:
    """:func:`_grid_patch_images` with VideoLLaMA3's ``image_merge_sizes`` (its image processor's 1 per image)."""
    inputs = _grid_patch_images(config, counts, g)
    return {**inputs, "image_merge_sizes": torch.ones(len(inputs["image_grid_thw"]), dtype=torch.long)}


_IDEFICS = dict(layout="per_sample", vision_tower="model.vision_model", projector="model.connector",
                language_model="model.text_model")
_PINPOINTS = [[16, 32], [32, 16], [32, 32]]
# The processor's prompt puts "<image>\n": a text token after each image, so images of different sizes (whose
# placeholder counts differ) stay told apart by their runs of placeholders.
_PROMPT_NEWLINE = TEXT_IDS.start
_DEEPSTACK = dict(deepstack_visual_indexes=[0], num_position_embeddings=16)
_QWEN_SPAN = _wrapped(["vision_start_token_id"], ["vision_end_token_id"])
_MROPE = dict(rope_parameters={"mrope_section": [2, 1, 1]})  # half of head_dim 8
# GLM-4V-MoE rotates half of head_dim (partial_rotary_factor 0.5).
_GLM = dict(text=dict(head_dim=16, rope_parameters={"mrope_section": [2, 1, 1]}))
_QWEN = dict(layout="grid", grid_key="image_grid_thw", vision_tower="model.visual", projector="model.visual.merger",
             extra=_image_types("mm_token_type_ids"))

_CASES = [
    VLMCase("llava", _square_images, _wrapped()),
    VLMCase("llava_next", _anyres_images, _wrapped((), (_PROMPT_NEWLINE,)), config=dict(image_grid_pinpoints=_PINPOINTS)),
    VLMCase("mistral3", _pixtral_images, _pixtral_span),
    VLMCase("lighton_ocr", _pixtral_images, _pixtral_span, vision_tower="model.vision_encoder",
            projector="model.vision_projection"),
    VLMCase("gemma3", _square_images, _wrapped(["boi_token_index"], ["eoi_token_index"]),
            config=dict(mm_tokens_per_image=4), extra=_image_types("token_type_ids")),
    VLMCase("paligemma", _square_images, _wrapped(), images_before_bos=True, extra=_paligemma_extra),
    VLMCase("idefics3", _idefics_images, _wrapped([_IMG_START, _GLOBAL_IMG], [_IMG_START]), **_IDEFICS),
    VLMCase("qwen2_vl", _grid_images, _QWEN_SPAN, config=dict(text=_MROPE), **_QWEN),
    VLMCase("qwen2_5_vl", _grid_images, _QWEN_SPAN, **_QWEN,
            config=dict(text=_MROPE, vision=dict(window_size=16, fullatt_block_indexes=[1]))),
    VLMCase("qwen3_vl", _grid_images, _QWEN_SPAN, config=dict(text=_MROPE, vision=_DEEPSTACK), **_QWEN),
    VLMCase("internvl", _square_images, _wrapped([_IMG_START], [_IMG_END]),
            config=dict(vision=dict(image_size=[16, 16], patch_size=[4, 4]))),
    VLMCase("smolvlm", _idefics_images, _wrapped([_IMG_START, _GLOBAL_IMG], [_IMG_START]), **_IDEFICS),
    # One tile per image: <|START_OF_IMG|> TILE_GLOBAL patches <|END_OF_IMG|>.
    VLMCase("aya_vision", _square_images, _wrapped([_IMG_START, _GLOBAL_IMG], [_IMG_END])),
    VLMCase("llava_onevision", _anyres_images, _wrapped((), (_PROMPT_NEWLINE,)), config=dict(image_grid_pinpoints=_PINPOINTS)),
    # One tile per image: boi, the tile's patches and a line break, eoi.
    VLMCase("cohere2_vision", _square_images, _wrapped([_IMG_START], [_IMG_BREAK, _IMG_END]),
            config=dict(alignment_intermediate_size=64)),
    *(VLMCase(mt, _grid_images, _wrapped(["image_start_token_id"], ["image_end_token_id"]), **_QWEN,
              config=_GLM if mt == "glm4v_moe" else dict(text=_MROPE))
      for mt in ("glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr")),
    VLMCase("qwen3_vl_moe", _grid_images, _QWEN_SPAN, config=dict(text=_MROPE, vision=_DEEPSTACK), **_QWEN),
    VLMCase("idefics2", _idefics_images, _wrapped([_IMG_START], [_IMG_START]), **_IDEFICS,
            config=dict(subs=dict(perceiver_config=dict(
                resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                num_key_value_heads=1)))),
    VLMCase("llava_next_video", _anyres_images, _wrapped((), (_PROMPT_NEWLINE,)), config=dict(image_grid_pinpoints=_PINPOINTS)),
    VLMCase("video_llava", _square_images, _wrapped(), vision_tower="model.image_tower"),
    VLMCase("janus", _square_images, _wrapped([_IMG_START], [_IMG_END]), vision_tower="model.vision_model",
            projector="model.aligner", config=dict(subs=dict(vq_config=dict(
                num_embeddings=64, latent_channels=32, base_channels=32, num_res_blocks=1, channel_multiplier=[1, 2],
                image_token_embed_dim=HIDDEN, num_patches=4)))),
    # One tile, no thumbnail: <|image_start|> image tokens <|image_end|>.
    VLMCase("lfm2_vl", _patch_images, _wrapped([_IMG_START], [_IMG_END]),
            config=dict(projector_hidden_size=64, vision=dict(num_patches=16))),
    # The visual indicator ids get embeddings from the visual table; which one the tokenizer gives to which of
    # <IMG_START>, <IMG_GRID>, <IMG_END>... is not in the config: the first and last wrap each image here.
    VLMCase("ovis2", _square_images, _ovis2_span, projector="model.visual_embeddings_table",
            config=dict(vision=dict(vocab_size=64))),
    VLMCase("granite_docling", _tile_images, _wrapped([_IMG_START, _GLOBAL_IMG], [_IMG_START]),
            # The vision model holds its own projection; its deepstack feeds one decoder layer (a 4-stage split).
            config=dict(vision=dict(deepstack_visual_indexes=[0])), **{**_IDEFICS, "projector": None}),
    # Qwen2.5-VL's vision tower and 1-D rope: the processor writes only the image pads.
    VLMCase("hyperclovax_vision_v2", _grid_images, _wrapped(), layout="grid", grid_key="image_grid_thw",
            vision_tower="model.vision_model", projector="model.projector",
            config=dict(vision=dict(window_size=16, fullatt_block_indexes=[1]))),
    VLMCase("got_ocr2", _square_images, _wrapped([_IMG_START], [_IMG_END]), config=dict(vision=dict(
        output_channels=32, mlp_dim=64, window_size=2, global_attn_indexes=[1], initializer_range=0.02))),
    VLMCase("deepseek_vl", _square_images, _wrapped(), vision_tower="model.vision_model", projector="model.aligner"),
    # Llava with the projector over several vision layers' features (2 layers here: hidden states 0-2).
    VLMCase("vipllava", _square_images, _wrapped(), config=dict(vision_feature_layers=[-2, 0, 1])),
    # Gemma 3 under the ShieldGemma2 config (its classifier wraps Gemma3ForConditionalGeneration).
    VLMCase("shieldgemma2", _square_images, _wrapped(["boi_token_index"], ["eoi_token_index"]),
            config=dict(mm_tokens_per_image=4), extra=_image_types("token_type_ids")),
    # Qwen3-VL's vision tower without deepstack; hybrid decoder (3 linear-attention layers, 1 full).
    *(VLMCase(mt, _grid_images, _QWEN_SPAN, config=dict(text=_MROPE, vision=dict(num_position_embeddings=16)), **_QWEN)
      for mt in ("qwen3_5", "qwen3_5_moe")),
    VLMCase("paddleocr_vl", _grid_patch_images, _QWEN_SPAN, config=dict(text=_MROPE),
            **{**_QWEN, "projector": "model.projector"}),
    # GOT-OCR2's model under the PP-Chart2Table config.
    VLMCase("pp_chart2table", _square_images, _wrapped([_IMG_START], [_IMG_END]), config=dict(vision=dict(
        output_channels=32, mlp_dim=64, window_size=2, global_attn_indexes=[1], initializer_range=0.02))),
    # Grid patches with one image_merge_sizes entry per image; 1-D positions, the processor writes only image pads.
    VLMCase("video_llama_3", _merged_grid_images, _wrapped(), layout="grid", grid_key="image_grid_thw",
            vision_tower="model.vision_model", projector="model.projector"),
    VLMCase("qianfan_ocr", _square_images, _wrapped([_IMG_START], [_IMG_END]),
            config=dict(vision=dict(image_size=[16, 16], patch_size=[4, 4], drop_path_rate=0.0))),
    # Global views only (no pixel_values_local); SAM 8x8 patches, downsampled to 2x2 for the CLIP encoder.
    # Its eager attention does not repeat KV heads: as many KV heads as query heads.
    VLMCase("unlimited_ocr", _sam_images, _wrapped(), config=dict(text=dict(num_key_value_heads=4), vision=dict(
        sam_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                        patch_size=8, window_size=2, global_attn_indexes=[1], mlp_dim=64, downsample_channels=[32, 32],
                        initializer_range=0.02),
        encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=8)))),
    # Global views only (no pixel_values_local); sliding and full attention layers, a sparse MoE layer.
    VLMCase("step3p7", _square_images, _wrapped(), vision_tower="model.vision_model", config=dict(
        vision=dict(image_size=32, max_position_embeddings=64),
        text=dict(share_expert_dim=32, layer_types=["sliding_attention", "full_attention"] * 2))),
    # Siglip2 patches on Qwen-VL's grid layout, interleaved M-RoPE (sections of 3 rotary pairs).
    VLMCase("cosmos3_edge", _grid_images, _QWEN_SPAN, **{**_QWEN, "projector": "model.projector"},
            config=dict(text=_MROPE, vision=dict(num_patches=16), projector_hidden_size=64)),
    # Its projector maps a known patch count to its queries: 16 patches (16 x 16 pixels) to 4 tokens.
    VLMCase("aria", _masked_images, _wrapped(), config=dict(projector_patch_to_query_dict={16: 4},
                                                             text=dict(moe_num_experts=4))),
    # Qwen2.5-VL's vision tower (windowed attention) before EXAONE 4's decoder, 1-D positions.
    VLMCase("exaone4_5", _grid_images, _wrapped(), layout="grid", grid_key="image_grid_thw",
            vision_tower="model.visual", projector="model.visual.merger",
            config=dict(vision=dict(window_size=16, fullatt_block_indexes=[1]))),
    # Patches as [total, 3, patch, patch] on the grid layout; DeepSeek-V3 decoder (MLA, MoE).
    VLMCase("kimi_k25", _grid_patch_images, _QWEN_SPAN, layout="grid", grid_key="image_grid_thw",
            projector="model.mm_projector", config=dict(vision=dict(pos_emb_height=4, pos_emb_width=4),
                                                        projection_hidden_size=32)),
    # Sparse-attention layers (a lightning indexer keeps 2 of the 4-token blocks) between full ones.
    VLMCase("minimax_m3_vl", _grid_images, _wrapped(), layout="grid", grid_key="image_grid_thw",
            config=dict(projector_hidden_size=64, text=dict(
                index_block_size=4, index_topk_blocks=2, index_head_dim=16, dense_intermediate_size=64,
                shared_intermediate_size=32, layer_types=["minimax_m3_sparse", "full_attention"] * 2,
                mlp_layer_types=["dense", "sparse"] * 2))),
    VLMCase("deepseek_vl_hybrid", _hybrid_images, _wrapped(), vision_tower="model.vision_model",
            projector="model.aligner",
            config=dict(subs=dict(high_res_vision_config=dict(
                hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=4, window_size=2, global_attn_indexes=[1], mlp_dim=64)))),
]
VLM_CASES: dict[str, VLMCase] = {case.model_type: case for case in _CASES}

# Why each other type has no case: the first failure of the generic recipe (shrunk config, square
# pixel_values, plain image tokens), and what a case would need.
_REFUSED = "hf_pp refuses it (hf_pp.multimodal.UNSUPPORTED_MULTIMODAL gives why)"
_NOT_BUILT: dict[str, str] = {
    "apertus1p5": "config: its audio codec (WavTokenizer) needs codebook_dim == hidden_size; shrink not written",
    "blip": "not a decoder VLM (BLIP captioner: vision encoder + text decoder with cross-attention)",
    "blip-2": "Q-Former model; its vision config has no num_channels, qformer shrink not written",
    "chameleon": "model: images are VQ-tokenised (no vision tower); vq_config shrink not written",
    "cohere_compass": "model: KeyError 'full_attention' (wants per-layer-type rope_parameters); not written",
    "cosmos3_omni": "Qwen3-VL vision + audio: case not written (grid recipe would apply)",
    "deepseek_ocr2": "default config takes over a minute to build (SAM + CLIP towers); not shrunk",
    "diffusion_gemma": "block-diffusion LM (DiffusionGemmaForBlockDiffusion), not causal image-text-to-text",
    "dots3_note": "config: per_layer_config keyed by layers 25-39 of the default; shrink not written",
    "emu3": "model: images are VQ-tokenised (no vision tower); vq_config shrink not written",
    "ernie4_5_vl_moe": _REFUSED,
    "evolla": "protein-text model (EvollaForProteinText2Text), no images",
    "fast_vlm": "needs timm (not installed)",
    "florence2": "encoder-decoder (BART-style) and patch_size must be a per-stage list",
    "fuyu": "no vision tower (patches go through one linear layer), FuyuForCausalLM with image_patches inputs",
    "gemma3n": "needs timm (not installed): MobileNetV5 vision tower",
    "gemma4": "vision config is None by default in the VLM config; case not written",
    "gemma4_unified": "vision config is None by default in the VLM config; case not written",
    "git": "GitForCausalLM: vision encoder prefix + BERT-style text with 12 fixed heads; not a decoder split",
    "granite4_vision": "model: TypeError (len() of None) with the shrunk config; case not written",
    "glm5_next": _REFUSED,
    "hunyuan_vl": "vision config has no image_size (patch-grid input); case not written",
    "hy_v4_vl": _REFUSED,
    "idefics": "Idefics 1: cross-attention (gated x-attn) layers, no get_image_features",
    "inkling2": "config: vision_config.text_hidden_size must equal text hidden size; shrink not written",
    "inkling2_loop": "config: vision_config.text_hidden_size must equal text hidden size; shrink not written",
    "instructblip": "Q-Former model; its vision config has no num_channels, qformer shrink not written",
    "instructblipvideo": "Q-Former model; its vision config has no num_channels, qformer shrink not written",
    "kosmos-2": "no .model attribute (text_model / vision_model at the top) and grounding inputs; case not written",
    "kosmos-2.5": "encoder-decoder with flattened_patches input; case not written",
    "lfm3_vl": "config: layer_types of the default (14) not cut with the layer count; case not written",
    "llama4": "no .model attribute (vision_model / language_model at the top); case not written",
    "mllama": "cross-attention image layers inside the decoder (no get_image_features); not a prefix VLM",
    "molmo2": _REFUSED,
    "muse_glimmer": "config: layer_types of the default (50) not cut with the layer count; case not written",
    "muse_spark": "config: layer_types of the default (50) not cut with the layer count; case not written",
    "minicpm_ocr": _REFUSED,
    "minicpmv4_6": _REFUSED,
    "minicpmv4_7": _REFUSED,
    "mistral4": "default config takes over a minute to build; not shrunk",
    "mistral_large4": _REFUSED,
    "perception_lm": "needs timm (not installed): TimmWrapper vision tower",
}


def unbuilt_vlm_types() -> dict[str, str]:
    """Every image-text-to-text model type without a case, and why."""
    return {mt: _NOT_BUILT.get(mt, "not tried yet: no case written")
            for mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if mt not in VLM_CASES}
