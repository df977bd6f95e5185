"""A character tokenizer with a chat template and small SFT data sets (prompt-completion, conversational,
plain text for packing), generated here: no downloads."""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = list("0123456789+=.:? abcdefghijklmnopqrstuvwxyz\n")
VOCAB_SIZE = 64  # >= len(SPECIALS) + len(ALPHABET)

# Assistant turns inside {% generation %}: what assistant_only_loss trains on, end-of-turn token included.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}a:{% generation %}{{ message['content'] }}</s>{% endgeneration %}\n"
    "{% else %}u:{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _sums(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pairs.append((f"what is {a}+{b}?" if rng.random() < 0.5 else f"{a}+{b}=", f"{a + b}."))
    return pairs


def prompt_completion_dataset(count: int = 48, seed: int = 0) -> Dataset:
    pairs = _sums(count, seed)
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


def conversational_dataset(count: int = 48, seed: int = 0) -> Dataset:
    pairs = _sums(count, seed)
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                           for p, c in pairs]})


def text_dataset(count: int = 96, seed: int = 0) -> Dataset:
    """Documents of 4 to 20 characters: packing puts several into each row."""
    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(count)]
    return Dataset.from_dict({"text": texts})
