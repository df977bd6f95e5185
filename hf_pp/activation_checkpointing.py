"""Activation checkpointing of pipeline stages (``TrainingArguments.activation_checkpointing``).

Trainer turns it on by calling ``model.activation_checkpointing_enable(...)``.
Under pipelining the model is this rank's stages, so hf_pp does what a Hugging
Face model does for itself, on every decoder layer each stage holds. Each layer
(a ``GradientCheckpointingLayer``) gets the checkpoint function and its flag,
and then recomputes its forward during the backward instead of keeping its
activations. ``every_n_layers`` counts layers by their index in the *unsplit*
model, so the same layers are checkpointed whatever the split.

Only non-reentrant checkpointing (``use_reentrant=False``, the default) runs:
torch's pipeline stages compute their backward with ``torch.autograd.grad`` /
``backward(inputs=...)``, which reentrant checkpointing cannot serve, so
``use_reentrant=True`` is refused before any communication. So are the
split-backward (zero-bubble) schedules: their weight-gradient pass asks
autograd for one parameter group at a time, and each request recomputes the
checkpointed layer again. Non-reentrant checkpointing also needs no trick for
frozen embeddings under PEFT: the adapters inside a checkpointed layer get
their gradients either way.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                   num_attention_heads=2, num_key_value_heads=2)
    >>> enable_activation_checkpointing([LlamaForCausalLM(cfg)], every_n_layers=2)
    [0, 2]
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import PipelineConfigError

__all__ = ["enable_activation_checkpointing", "disable_activation_checkpointing", "check_activation_checkpointing"]


def check_activation_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None, splits_backward: bool = False,
                                   schedule_name: str = "") -> None:
    """Refuse, before any communication: a model that cannot checkpoint, reentrant checkpointing, and
    checkpointing under a split-backward (zero-bubble) schedule.

    Example:
        >>> check_activation_checkpointing(nn.Linear(2, 2), None)
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: Linear does not support activation checkpointing; ...
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PipelineConfigError(
            f"{type(model).__name__} does not support activation checkpointing; set activation_checkpointing=False."
        )
    if (checkpoint_kwargs or {}).get("use_reentrant", False):
        raise PipelineConfigError(
            "activation_checkpointing_kwargs use_reentrant=True cannot run under pipelining: torch's pipeline "
            "stages compute gradients for their inputs only (autograd.grad), which reentrant checkpointing does not "
            "support; use use_reentrant=False (the default)."
        )
    if splits_backward:
        # Measured: a Llama layer on a stage that needs input gradients ran its forward ~11 times per microbatch.
        raise PipelineConfigError(
            f"activation_checkpointing under {schedule_name} recomputes every checkpointed layer once per parameter "
            "group in the schedule's separate weight-gradient pass (about 10 extra forwards per microbatch for a "
            "Llama layer). Use a schedule that runs one backward (1f1b, interleaved_1f1b, gpipe, looped_bfs), or "
            "set activation_checkpointing=False."
        )


def _checkpointing_layers(part: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(index in the unsplit model, layer)`` of every checkpointable decoder layer of the stage."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = []
    for name, module in part.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            last = name.rsplit(".", 1)[-1]
            found.append((int(last) if last.isdigit() else len(found), module))
    return found


def enable_activation_checkpointing(parts: Iterable[nn.Module], checkpoint_kwargs: dict | None = None,
                                    every_n_layers: int = 1, offload: bool = False) -> list[int]:
    """Checkpoint the decoder layers of these stages; return the (unsplit-model) indices of the checkpointed ones.

    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default ``use_reentrant=False``);
    ``offload=True`` keeps the saved inputs on the CPU (``save_on_cpu``).
    """
    if every_n_layers < 1:
        raise PipelineConfigError(f"every_n_layers must be at least 1, got {every_n_layers}.")
    kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else dict(checkpoint_kwargs)
    run = checkpoint
    if offload:
        from torch.autograd.graph import save_on_cpu

        def run(function, *args, **kw):
            with save_on_cpu(pin_memory=False):
                return checkpoint(function, *args, **kw)

    func = functools.partial(run, **kwargs)
    checkpointed = []
    for part in parts:
        for index, layer in _checkpointing_layers(part):
            layer._gradient_checkpointing_func = func
            layer.gradient_checkpointing = index % every_n_layers == 0
            if layer.gradient_checkpointing:
                checkpointed.append(index)
    return sorted(checkpointed)


def disable_activation_checkpointing(parts: Iterable[nn.Module]) -> None:
    """Undo :func:`enable_activation_checkpointing`: every layer keeps its activations again."""
    for part in parts:
        for _, layer in _checkpointing_layers(part):
            layer.gradient_checkpointing = False

