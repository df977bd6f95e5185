"""Reading chosen tensors of a Hugging Face safetensors checkpoint straight into existing tensors.

A pipeline rank needs only its stage's tensors. ``safetensors.safe_open``
memory-maps whole files, and every page it touches counts towards the
process's resident memory until the file is closed, so a rank reading half a
shard would briefly hold its weights twice. The format is simple (an 8-byte
header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``,
then raw little-endian bytes), so we read each tensor's byte range with
``readinto`` directly into the parameter it belongs to: nothing but the
stage's own weights is ever resident.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import PipelineConfigError

__all__ = ["TensorEntry", "CheckpointIndex"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    path: str
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, from its header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise PipelineConfigError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which hf_pp cannot load.")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, data_start + begin, data_start + end, SAFETENSORS_DTYPES[info["dtype"]],
                                    tuple(info["shape"]))
    return entries


class CheckpointIndex:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or a sharded index).

    Only headers are read when it is built. Example::

        index = CheckpointIndex("path/to/model")
        index.missing(["model.embed_tokens.weight"])      # [] when present
        index.read_into({"model.norm.weight": stage.model.norm.weight})
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path, single_path = os.path.join(directory, INDEX_FILE), os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            files = [SINGLE_FILE]
        else:
            raise PipelineConfigError(
                f"{directory!r} has no {SINGLE_FILE} or {INDEX_FILE}. Per-stage loading reads safetensors only: "
                "re-save the model with save_pretrained() (safetensors is its default)."
            )
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise PipelineConfigError(f"{directory!r}: the index names {name}, which is not there.")
            self.entries.update(read_header(path))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in order) this checkpoint does not hold."""
        return [k for k in keys if k not in self.entries]

    def read_into(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill each target tensor from the checkpoint tensor named by its key (casting dtype if needed).

        Files are opened once each and read in offset order. A target on the
        CPU with the checkpoint's dtype is filled in place without any staging
        copy; otherwise one tensor at a time is staged on the CPU.
        """
        missing = self.missing(targets)
        if missing:
            raise PipelineConfigError(f"{self.directory!r} lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
        by_file: dict[str, list[tuple[TensorEntry, torch.Tensor, str]]] = {}
        for key, target in targets.items():
            entry = self.entries[key]
            if tuple(target.shape) != entry.shape:
                raise PipelineConfigError(
                    f"{self.directory!r}: {key!r} has shape {list(entry.shape)} but the model expects "
                    f"{list(target.shape)}; the checkpoint does not belong to this config."
                )
            by_file.setdefault(entry.path, []).append((entry, target, key))
        for path, items in by_file.items():
            with open(path, "rb", buffering=0) as f:
                for entry, target, _ in sorted(items, key=lambda item: item[0].start):
                    _read_tensor(f, entry, target)


def _read_tensor(f, entry: TensorEntry, target: torch.Tensor) -> None:
    if entry.end == entry.start:
        return
    direct = target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous()
    buffer = target.detach() if direct else torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
    f.seek(entry.start)
    done = 0
    while done < len(view):  # readinto may return short counts on large reads
        n = f.readinto(view[done:])
        if not n:
            raise PipelineConfigError(f"{entry.path} ends before tensor data at byte {entry.start + done}; the file is truncated.")
        done += n
    if not direct:
        with torch.no_grad():
            target.copy_(buffer)
