"""Processors for the tiny Llava and Qwen2.5-VL of :mod:`helpers.vlm_models`, built offline, and small
conversational image data sets for TRL's VLM SFT path (``DataCollatorForVisionLanguageModeling``): no downloads.

Each processor is the model type's own (``LlavaProcessor``, ``Qwen2_5_VLProcessor`` without its video processor,
which needs torchvision) over a character tokenizer (the one of :mod:`helpers.sft_fixtures`, plus the image
special tokens at the model's ids) and a PIL image processor sized for the tiny vision tower. The chat template
takes TRL's structured messages (content blocks of ``image`` and ``text``), puts the type's image prompt per
image block in the user turn, and marks assistant turns with ``{% generation %}`` for ``assistant_only_loss``.
:func:`vlm_processor` checks, on the model, that the processor gives as many placeholders as the model's
``get_image_features`` gives features (the forward refuses a mismatch).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from helpers.sft_fixtures import ALPHABET, SPECIALS
from helpers.vlm_models import VLM_CASES

__all__ = ["VLM_SFT_TYPES", "chat_template", "vlm_model", "vlm_processor", "image_conversations"]

VLM_SFT_TYPES = ("llava", "qwen2_5_vl")

# The prompt of one image and the special tokens (name -> config attribute of its id) of each type.
_IMAGE_PROMPT = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
_SPECIAL_TOKENS = {
    "llava": {"image_token": ("<image>", "image_token_id")},
    "qwen2_5_vl": {"image_token": ("<|image_pad|>", "image_token_id"), "video_token": ("<|video_pad|>", "video_token_id"),
                   "vision_start": ("<|vision_start|>", "vision_start_token_id"),
                   "vision_end": ("<|vision_end|>", "vision_end_token_id")},
}


def chat_template(image_prompt: str) -> str:
    """User turns: ``image_prompt`` per image block, then the text; assistant turns inside {% generation %}."""
    return (
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
        "{% else %}{% set blocks = message['content'] %}{% endif %}"
        "{% if message['role'] == 'assistant' %}a:{% generation %}"
        "{% for block in blocks %}{% if block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}"
        "</s>{% endgeneration %}\n"
        "{% else %}u:"
        "{% for block in blocks %}{% if block['type'] == 'image' %}" + image_prompt + "{% else %}{{ block['text'] }}"
        "{% endif %}{% endfor %}\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )


def vlm_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny VLM of ``VLM_CASES[model_type]`` (a 2-layer vision tower, a 4-layer text model)."""
    return VLM_CASES[model_type].model(seed)


def _tokenizer(model_type: str, config) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    specials = _SPECIAL_TOKENS[model_type]
    vocab.update({token: getattr(config, attr) for token, attr in specials.values()})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={name: token for name, (token, _) in specials.items()}, clean_up_tokenization_spaces=False,
    )


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (Qwen's needs torchvision): images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
        self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def vlm_processor(model_type: str, model=None) -> ProcessorMixin:
    """The processor of :func:`vlm_model`; with ``model``, its placeholders checked against the image features."""
    config = (model or vlm_model(model_type)).config
    vision = config.vision_config
    tokenizer, template = _tokenizer(model_type, config), chat_template(_IMAGE_PROMPT[model_type])
    if model_type == "llava":
        size = vision.image_size
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=tokenizer, patch_size=vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops again
            chat_template=template,
        )
    else:  # resized to 16x16..32x32 pixels in steps of 8 (patch 4, merged 2x2): 4 to 16 tokens per image
        side = vision.patch_size * vision.spatial_merge_size
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            size={"shortest_edge": (2 * side) ** 2, "longest_edge": (4 * side) ** 2})
        processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                 chat_template=template)
    assert processor.image_token_id == config.image_token_id, processor.image_token_id
    if model is not None:
        images = _images(random.Random(0), 2)
        pixels = processor.image_processor(images, return_tensors="pt")
        names = ("pixel_values", "image_grid_thw")
        with torch.no_grad():
            features = model.model.get_image_features(**{k: v for k, v in pixels.items() if k in names}).pooler_output
        expanded = processor(text=[_IMAGE_PROMPT[model_type]] * 2, images=[[image] for image in images],
                             return_tensors="pt", padding=True)
        placeholders = (expanded["input_ids"] == config.image_token_id).sum(-1).tolist()
        assert placeholders == [len(f) for f in features], (placeholders, [tuple(f.shape) for f in features])
    return processor


def _images(rng: random.Random, count: int) -> list[Image.Image]:
    """Random RGB images of different sizes (the image processor resizes and crops them)."""
    out = []
    for _ in range(count):
        height, width = rng.randint(12, 40), rng.randint(12, 40)
        pixels = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (height, width, 3), dtype=np.uint8)
        out.append(Image.fromarray(pixels))
    return out


def image_conversations(count: int = 32, seed: int = 0, without_image_every: int = 4) -> Dataset:
    """Conversations about a colour count in one random image; every ``without_image_every``-th sample has no
    image (text only), so batches mix samples with and without images."""
    rng = random.Random(seed)
    messages, images = [], []
    colours = ["red", "green", "blue", "dark", "light"]
    for i in range(count):
        has_image = i % without_image_every != without_image_every - 1
        question = rng.choice(["what is this?", "describe it.", "which colour?"]) if has_image else \
            f"what is {rng.randint(0, 9)}+{rng.randint(0, 9)}?"
        answer = " ".join(rng.choice(colours) for _ in range(rng.randint(1, 3))) + "."
        messages.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        images.append(_images(rng, 1) if has_image else [])
    return Dataset.from_dict({"messages": messages, "images": images})
