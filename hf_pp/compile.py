"""``torch.compile`` for pipeline stages: each decoder layer compiled on its own (``TrainingArguments.torch_compile``).

Trainer compiles the whole model through accelerate. A pipeline stage is not a
whole model: its forward takes and returns tensors, and torch's schedule calls
it once per microbatch. So hf_pp compiles each repeated block (decoder layer) of
every stage in place: that layer instance's ``forward`` is replaced by its
compiled version. The modules, parameter names and state dicts stay as they
were, so saving, loading, PEFT and the optimizer see no difference. Hooks on the
layer (FSDP2's all-gathers, for one) stay outside the compiled code and run
eagerly around it. Identical layers share dynamo's compiled code, so a stage
compiles once per input shape and grad mode (training, evaluation), not once
per layer.

Example:
    >>> import torch.nn as nn
    >>> part = nn.Sequential(nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    >>> compile_stage_layers([part], backend="eager")
    2
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch._dynamo.eval_frame import OptimizedModule

from .errors import PipelineConfigError
from .split import stage_layers

__all__ = ["compile_stage_layers", "check_compile_options", "is_compiled"]


def check_compile_options(backend: str | None, mode: str | None) -> None:
    """Refuse a ``torch_compile_backend`` dynamo does not know, or an inductor mode that does not exist.

    Pure (no compilation, no communication): the pre-flight runs it on every rank.

    Example:
        >>> check_compile_options("inductor", "max-autotune")
        >>> check_compile_options("no-such-backend", None)
        Traceback (most recent call last):
        ...
        hf_pp.errors.PipelineConfigError: torch_compile_backend='no-such-backend' is not a torch.compile backend; ...
    """
    import torch._dynamo
    import torch._inductor

    if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise PipelineConfigError(
            f"torch_compile_backend={backend!r} is not a torch.compile backend; use one of "
            f"{', '.join(torch._dynamo.list_backends())} (inductor is the default)."
        )
    modes = list(torch._inductor.list_mode_options())
    if mode is not None and mode not in modes:
        raise PipelineConfigError(f"torch_compile_mode={mode!r} is not a torch.compile mode; use one of {', '.join(modes)}.")


def compile_stage_layers(parts: Iterable[nn.Module], *, backend: str | None = "inductor", mode: str | None = None) -> int:
    """Compile the ``forward`` of every decoder layer of every stage, in place; return how many were compiled.

    Run it after the split (and after any ``parallelize_fn``), before the first
    step. The layers are those :func:`hf_pp.split.stage_layers` finds: members of
    the stage's layer containers that hold weights. Embeddings, norms and the
    head stay eager.
    """
    check_compile_options(backend, mode)
    count = 0
    for part in parts:
        for layer in stage_layers(part):
            layer.forward = torch.compile(layer.forward, backend=backend or "inductor", mode=mode)
            count += 1
    return count


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs compiled code: :func:`compile_stage_layers` (its ``forward`` replaced), ``compile()``,
    or a ``torch.compile`` wrapper.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> is_compiled(layer), compile_stage_layers([nn.ModuleList([layer])], backend="eager"), is_compiled(layer)
        (False, 1, True)
    """
    return (isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None
            or hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"))
