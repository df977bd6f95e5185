"""The shipped corpus and a character-level tokenizer built from it (no downloads).

Used by the examples: `corpus_dataset()` returns a `datasets.Dataset` of
tokenized lines and `char_tokenizer()` a real `PreTrainedTokenizerFast`, so
`processing_class`, saving and `generate` work as with a hub tokenizer.
"""

from __future__ import annotations

import os

from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.txt")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def corpus_lines() -> list[str]:
    with open(CORPUS) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted({c for line in corpus_lines() for c in line})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def corpus_dataset(tokenizer: PreTrainedTokenizerFast, max_length: int = 32) -> Dataset:
    """One example per corpus line: <s> line </s>, truncated to max_length tokens."""
    return lines_dataset(tokenizer, corpus_lines(), max_length)


def decode_chars(tokenizer: PreTrainedTokenizerFast, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True))


def multiplication_lines(seed: int = 0, count: int = 400) -> list[str]:
    """A task the base corpus never shows ("a times b is c."), for the LoRA fine-tune."""
    import random

    rng = random.Random(seed)
    return [f"{a} times {b} is {a * b}." for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(count))]


def lines_dataset(tokenizer: PreTrainedTokenizerFast, lines: list[str], max_length: int = 32) -> Dataset:
    def encode(batch):
        ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for t in batch["text"]]
        return {"input_ids": [x[:max_length] for x in ids]}

    return Dataset.from_dict({"text": lines}).map(encode, batched=True, remove_columns=["text"])


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 128, num_layers: int = 8) -> LlamaConfig:
    """A small Llama sized for the character tokenizer (built from a config: no download)."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, use_cache=False,
    )
