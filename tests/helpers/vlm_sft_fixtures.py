"""A processor for the tiny Llava of :mod:`helpers.vlm_models`, built offline, and small conversational image data
sets for TRL's VLM SFT path (``DataCollatorForVisionLanguageModeling``): no downloads.

The processor is a ``LlavaProcessor`` over a character tokenizer (the one of :mod:`helpers.sft_fixtures`, plus an
``<image>`` special token at the model's ``image_token_id``) and a CLIP image processor that crops to the tiny
vision tower's 16x16 input. Its chat template takes TRL's structured messages (content blocks of ``image`` and
``text``), puts one ``<image>`` per image block in the user turn, and marks assistant turns with
``{% generation %}`` for ``assistant_only_loss``. :func:`llava_processor` checks that the processor's expansion
of ``<image>`` has as many placeholders as the model's ``get_image_features`` gives.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from helpers.sft_fixtures import ALPHABET, SPECIALS
from helpers.vlm_models import VLM_CASES

__all__ = ["VLM_CHAT_TEMPLATE", "llava_model", "llava_processor", "image_conversations"]

IMAGE_TOKEN = "<image>"

# User turns: one <image> per image block, then the text; assistant turns inside {% generation %}.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set blocks = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}a:{% generation %}"
    "{% for block in blocks %}{% if block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}"
    "</s>{% endgeneration %}\n"
    "{% else %}u:"
    "{% for block in blocks %}{% if block['type'] == 'image' %}<image>{% else %}{{ block['text'] }}{% endif %}"
    "{% endfor %}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def llava_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Llava of ``VLM_CASES["llava"]`` (CLIP tower on 16x16 images, patch 4, 4-layer Llama)."""
    return VLM_CASES["llava"].model(seed)


def _tokenizer(image_token_id: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    vocab[IMAGE_TOKEN] = image_token_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, clean_up_tokenization_spaces=False,
    )


def llava_processor(model=None) -> LlavaProcessor:
    """A ``LlavaProcessor`` for :func:`llava_model`; with ``model``, checked against its image features."""
    config = (model or llava_model()).config
    vision = config.vision_config
    size = vision.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=_tokenizer(config.image_token_id), patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops again
        chat_template=VLM_CHAT_TEMPLATE,
    )
    assert processor.image_token_id == config.image_token_id, processor.image_token_id
    if model is not None:
        pixels = processor.image_processor(_images(random.Random(0), 1), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]  # one per image
        expanded = processor(text=[IMAGE_TOKEN], images=[_images(random.Random(0), 1)], return_tensors="pt")
        placeholders = int((expanded["input_ids"] == config.image_token_id).sum())
        assert placeholders == features.shape[0], (placeholders, tuple(features.shape))
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
