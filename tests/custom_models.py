"""Non-Hugging-Face models for the functional API tests, and their stage plans."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_pp.stage_math import layered_model_fqns_per_stage


class CustomTransformerBlock(nn.Module):
    """The spec's block, with ``batch_first=True``: microbatches split dim 0,
    so dim 0 must be the batch, not the sequence, for the split to be exact.
    No attention biases: the key bias has an analytically zero gradient, and
    AdamW would turn its float noise into full-size, split-dependent steps."""

    def __init__(self, hidden_size: int, num_heads: int = 8):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=num_heads, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size * 4), nn.GELU(), nn.Linear(hidden_size * 4, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x):
        attn_out, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm1(x + attn_out)
        return self.norm2(x + self.mlp(x))


class CustomModel(nn.Module):
    """The spec's CustomModel with a pipeline-friendly forward: modules a stage
    does not hold are ``None`` and simply skipped."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([CustomTransformerBlock(hidden_size) for _ in range(num_layers)])
        self.output_proj = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers or ():
            x = layer(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x


def custom_model_fqns(num_stages: int, num_layers: int) -> list[list[str]]:
    return layered_model_fqns_per_stage(
        num_stages, [f"layers.{i}" for i in range(num_layers)], first=["embedding"], last=["output_proj"]
    )


def residual_mlp(width: int, num_blocks: int) -> nn.Sequential:
    """A regression model whose root is an ``nn.Sequential`` (no custom forward at all)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            return x + torch.tanh(self.fc(self.norm(x)))

    return nn.Sequential(nn.Linear(width, width), *[Block() for _ in range(num_blocks)], nn.Linear(width, 1))


def residual_mlp_fqns(num_stages: int, num_blocks: int) -> list[list[str]]:
    return layered_model_fqns_per_stage(num_stages, [str(i + 1) for i in range(num_blocks)], first=["0"], last=[str(num_blocks + 1)])


def token_ce_loss(total_tokens: int):
    """Sum cross-entropy divided by the whole batch's token count: summed over
    microbatches it equals the unsplit mean, so use it with scale_grads=False."""

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / total_tokens

    return loss_fn


def mse_sum_loss(total_items: int):
    def loss_fn(pred, target):
        return F.mse_loss(pred, target, reduction="sum") / total_items

    return loss_fn
