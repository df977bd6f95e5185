"""transformers' own weight conversion, applied per stage: on-disk keys to model keys when loading, and
back to the original layout when saving.

transformers 5 converts checkpoints while loading (``conversion_mapping.get_model_conversion_mapping``:
``WeightRenaming`` rules such as Mixtral's ``block_sparse_moe`` -> ``mlp``, and ``WeightConverter`` rules
such as per-expert ``w1``/``w3`` merged into one ``gate_up_proj``) and ``save_pretrained`` reverts them
(``core_model_loading.revert_weight_conversion``). A pipeline stage holds a part of the model under the
unsplit model's names, so the same rules apply to it: a stage reads only the on-disk tensors whose
converted names it holds (its experts, never another stage's), and writes its tensors back in the
layout ``save_pretrained`` writes. Checkpoints already in the converted layout load unchanged.

This module is the one place hf_pp touches that transformers API (it has changed between 5.x releases);
it is tested on the pinned version.

Example::

    weights = ConvertedCheckpoint(CheckpointIndex("mixtral-dir"), stage_module, stage_module.state_dict())
    weights.missing(["model.layers.0.mlp.experts.gate_up_proj"])   # [] : built from experts.*.w1 / w3
    weights.read_into({"model.layers.0.mlp.experts.gate_up_proj": tensor})
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from .errors import PipelineConfigError
from .safetensors_reader import CheckpointIndex

__all__ = ["ConvertedCheckpoint", "original_layout"]


def _transforms(model: nn.Module, *, for_saving: bool) -> list:
    """The model's conversion rules (empty for a module transformers has none for)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping

    if not isinstance(model, PreTrainedModel):
        return []
    return list(get_model_conversion_mapping(model, add_legacy=not for_saving))


class ConvertedCheckpoint:
    """A checkpoint seen under the names of ``model``'s state dict, through the model's conversion rules.

    ``expected`` are the model keys a caller may ask for (a stage's keys); on-disk tensors that convert to
    none of them are never read. Offers the :class:`~hf_pp.safetensors_reader.CheckpointIndex` reading
    interface (``in``, :meth:`missing`, :meth:`read_into`).
    """

    def __init__(self, index: CheckpointIndex, model: nn.Module, expected: Iterable[str]):
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.index, self.model = index, model
        self.directory = index.directory
        transforms = _transforms(model, for_saving=False)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        known = dict.fromkeys(expected, True)  # rename_source_key reads it with .get(): a dict of the keys
        prefix = getattr(model, "base_model_prefix", None) or None
        self._plain: dict[str, str] = {}  # model key -> on-disk key (at most renamed)
        self._groups: dict[str, tuple] = {}  # first produced key -> (converter, [(on-disk key, pattern)], produced)
        self._group_of: dict[str, str] = {}  # produced model key -> its group
        for key in sorted(index.keys(), key=dot_natural_key):  # experts in index order, as transformers collects them
            target, pattern = rename_source_key(key, renamings, converters, prefix, known)
            if target not in known and key in known:
                target, pattern = key, None
            if pattern is None:
                if target in known:
                    self._plain[target] = key
                continue
            converter = by_pattern[pattern]
            produced = [target.replace(converter.target_patterns[0], name) for name in converter.target_patterns]
            if not any(name in known for name in produced):
                continue
            group = self._groups.setdefault(target, (converter, [], produced))
            group[1].append((key, pattern))
            self._group_of.update(dict.fromkeys(produced, target))

    def __contains__(self, key: str) -> bool:
        return key in self._plain or key in self._group_of

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The model keys (in order) this checkpoint cannot produce."""
        return [k for k in keys if k not in self]

    def source_keys(self, keys: Iterable[str]) -> set[str]:
        """The on-disk tensors that reading ``keys`` reads."""
        found = set()
        for key in keys:
            if key in self._plain:
                found.add(self._plain[key])
            elif key in self._group_of:
                found.update(source for source, _ in self._groups[self._group_of[key]][1])
        return found

    def read_into(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill each target (by model key): plain tensors straight from disk, converted ones through their rule."""
        missing = self.missing(targets)
        if missing:
            raise PipelineConfigError(
                f"{self.directory!r} lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} (nor the on-disk "
                "tensors transformers converts into them, e.g. per-expert weights)."
            )
        self.index.read_into({self._plain[k]: t for k, t in targets.items() if k in self._plain})
        for first in dict.fromkeys(self._group_of[k] for k in targets if k not in self._plain):
            converter, sources, produced = self._groups[first]
            for name, value in self._convert(first, converter, sources).items():
                if name not in targets:
                    continue
                target = targets[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise PipelineConfigError(
                        f"{self.directory!r}: {name!r} converts to shape {list(value.shape)} but the model expects "
                        f"{list(target.shape)}; the checkpoint does not belong to this config."
                    )
                with torch.no_grad():
                    target.copy_(value)

    def _convert(self, first: str, converter, sources: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        import transformers

        mapping = copy.deepcopy(converter)  # each target gets its own converter, as transformers does
        for key, pattern in sources:
            # Read when the rule runs, so only one group's source tensors are held at a time.
            mapping.add_tensor(first, key, pattern, lambda key=key: self.index.read_tensor(key))
        try:
            converted = mapping.convert(first, model=self.model, config=getattr(self.model, "config", None))
        except Exception as error:  # noqa: BLE001 - any failing op: name the tensor and the version
            raise PipelineConfigError(
                f"transformers {transformers.__version__} could not convert {[k for k, _ in sources][:4]} of "
                f"{self.directory!r} into {first!r}: {type(error).__name__}: {error}"
            ) from None
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}


def original_layout(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (of ``model``, or of a stage of it) in the layout ``save_pretrained`` writes.

    transformers' own reverse conversion, applied to the tensors at hand: a stage's experts are split back
    into per-expert tensors without any other stage's. Unchanged for models without conversion rules.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> sorted(original_layout(model, {"model.norm.weight": torch.ones(8)}))
        ['model.norm.weight']
    """
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(model, PreTrainedModel) or not state_dict:
        return state_dict
    try:
        return revert_weight_conversion(model, state_dict)
    except Exception as error:  # noqa: BLE001 - name the version: the reverse ops differ between releases
        import transformers

        raise PipelineConfigError(
            f"transformers {transformers.__version__} could not write {type(model).__name__}'s tensors back in "
            f"their original layout ({type(error).__name__}: {error}); save with pp_size=1 or report the model."
        ) from None
