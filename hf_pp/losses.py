"""Loss functions for pipeline stages (the last stage calls them per microbatch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "count_loss_tokens"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, labels shifted like Hugging Face's causal-LM loss.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to
    ``ignore_index`` (padding, prompts) count for nothing. The loss is computed
    in fp32. Reduction:

    * ``num_items_in_batch=None``: mean over the non-ignored tokens of these logits;
    * ``num_items_in_batch=N``: sum over these tokens divided by ``N``. Give ``N``
      = non-ignored (shifted) tokens of the whole optimizer step (all microbatches,
      all accumulation steps): the per-microbatch losses of a pipeline schedule then
      add up to exactly the unsplit model's mean loss (use ``scale_grads=False``).

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> labels = torch.tensor([[0, 1, -100]])
        >>> round(causal_lm_loss(logits, labels).item(), 4)  # one counted token, uniform logits: ln 4
        1.3863
        >>> round(causal_lm_loss(logits, labels, num_items_in_batch=2).item(), 4)
        0.6931
    """
    # Shift by padding on the right, as Hugging Face does, so shapes stay (B, T).
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def count_loss_tokens(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Number of tokens that :func:`causal_lm_loss` counts (labels after the shift).

    Example:
        >>> count_loss_tokens(torch.tensor([[5, 6, -100], [7, 8, 9]]))
        3
    """
    return int((labels[..., 1:] != ignore_index).sum())


