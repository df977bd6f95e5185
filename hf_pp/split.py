"""Cutting a model into stage modules that keep their original FQNs.

A stage module is a copy of the model holding only the modules listed for
that stage: a layer container keeps its surviving layers under their original
indices (so ``model.layers.17.mlp.weight`` is still called that), every other
absent module becomes ``None``. Only the stage's own parameters are copied.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Iterator, Sequence

import torch.nn as nn

from .errors import PipelineConfigError

__all__ = ["PrunedModuleList", "validate_stage_fqns", "tied_parameter_groups", "copy_stage_module", "stage_layers",
           "module_at"]


class PrunedModuleList(nn.Module):
    """The layers of a ``ModuleList`` / ``Sequential`` that one stage keeps.

    Children keep their original index as name. Iteration, ``len`` and slices
    see only the kept layers, in order; ``layers[i]`` looks up original index i;
    calling it runs the layers in sequence, like ``nn.Sequential``.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self._modules.values())[index]
        return self._modules[str(index)]

    def forward(self, x, *args, **kwargs):
        for layer in self:
            x = layer(x, *args, **kwargs)
        return x


def stage_layers(part: nn.Module) -> list[nn.Module]:
    """The stage's repeated blocks (decoder layers): the members of its layer containers that hold weights."""
    found = []
    for module in part.modules():
        if isinstance(module, (nn.ModuleList, PrunedModuleList)):
            found.extend(child for child in module.children() if next(child.parameters(), None) is not None)
    return found


def _covered_by(name: str, fqns: Sequence[str]) -> str | None:
    """The listed FQN that ``name`` (a parameter or module FQN) lies under, if any."""
    for fqn in fqns:
        if name == fqn or name.startswith(fqn + "."):
            return fqn
    return None


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """FQN groups that name one shared parameter object (e.g. tied embeddings)."""
    names = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return [group for group in names.values() if len(group) > 1]


def validate_stage_fqns(model: nn.Module, fqns_per_stage: Sequence[Sequence[str]]) -> None:
    """Refuse a split where a FQN is unknown or a parameter sits on no stage or on two.

    A parameter shared under two names (tied weights) may appear once under
    each name on different stages; the trainer keeps those copies in sync.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for stage, fqns in enumerate(fqns_per_stage):
        if not fqns:
            raise PipelineConfigError(f"Stage {stage} has no modules; every stage needs at least one.")
        for fqn in fqns:
            if fqn not in modules and fqn not in parameters:
                close = [m for m in modules if m and m.split(".")[-1] == fqn.split(".")[-1]][:3]
                hint = f" Did you mean one of {close}?" if close else ""
                raise PipelineConfigError(
                    f"Module {fqn!r} listed for stage {stage} does not exist in {type(model).__name__}.{hint}"
                )
    for name, _ in model.named_parameters(remove_duplicate=False):
        owners = [stage for stage, fqns in enumerate(fqns_per_stage) if _covered_by(name, fqns)]
        if not owners:
            raise PipelineConfigError(
                f"Parameter {name!r} belongs to no stage: add its module to one stage's module FQN list."
            )
        if len(owners) > 1:
            raise PipelineConfigError(
                f"Parameter {name!r} would live on stages {owners}; list its module on exactly one stage."
            )
    # Two FQNs of one stage that nest would copy the inner module twice.
    for stage, fqns in enumerate(fqns_per_stage):
        for fqn in fqns:
            outer = _covered_by(fqn, [f for f in fqns if f != fqn])
            if outer is not None:
                raise PipelineConfigError(f"Stage {stage} lists both {outer!r} and {fqn!r}, which lies inside it.")


def _detach_absent(module: nn.Module, prefix: str, keep: Sequence[str], undo: list) -> None:
    """Unhook, in place, every child not on a path to a kept FQN, and the own parameters of the modules on
    such a path unless listed (a VLM's ``model.image_newline``); record how to undo it."""
    if prefix:
        for name, param in list(module._parameters.items()):
            if param is not None and prefix + name not in keep:
                undo.append((module._parameters, name, param))
                module._parameters[name] = None
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        fqn = prefix + name
        if fqn in keep:
            continue
        if any(k.startswith(fqn + ".") for k in keep):
            _detach_absent(child, fqn + ".", keep, undo)
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                kept = {k: m for k, m in child._modules.items() if m is not None}
                if len(kept) != len(child._modules):
                    undo.append((module._modules, name, child))
                    # Built from the originals; deepcopy below copies them once.
                    module._modules[name] = PrunedModuleList(kept)
        else:
            undo.append((module._modules, name, child))
            module._modules[name] = None


def copy_stage_module(model: nn.Module, keep: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` restricted to the modules in ``keep`` (and their ancestors).

    The model is pruned in place for the duration of the copy and restored
    afterwards, so only the stage's own weights are ever duplicated.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> stage = copy_stage_module(net, ["2"])
        >>> [name for name, _ in stage.named_parameters()]
        ['2.weight', '2.bias']
    """
    undo: list = []
    try:
        _detach_absent(model, "", list(keep), undo)
        if isinstance(model, (nn.ModuleList, nn.Sequential)):
            stage = PrunedModuleList({k: m for k, m in model._modules.items() if m is not None})
            return copy.deepcopy(stage)
        return copy.deepcopy(model)
    finally:
        for modules, name, child in reversed(undo):
            modules[name] = child


def module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted attribute path (``""``: the model itself), None where a part is absent.

    Example:
        >>> module_at(nn.Sequential(nn.Sequential(nn.ReLU())), "0.0")
        ReLU()
    """
    for name in path.split(".") if path else ():
        model = getattr(model, name, None) if model is not None else None
    return model
