"""Non-Hugging-Face models for the functional API tests, and their stage plans."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The spec's model, exactly as the example trains it (one definition for both; examples/ is on pytest's
# pythonpath, see setup.cfg).
from custom_model_pipeline import CustomModel
from hf_pp.stage_math import layered_model_fqns_per_stage


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
