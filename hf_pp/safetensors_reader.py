"""Reading chosen tensors of a Hugging Face safetensors checkpoint (a directory or a hub id) straight into
existing tensors.

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
    """The tensors of a Hugging Face checkpoint: a local directory or a hub id, resolved as ``from_pretrained``
    resolves it (``transformers.utils.hub.cached_file``: the hub cache, ``HF_HUB_OFFLINE``, ``revision``,
    ``token``, ``cache_dir``, ``subfolder``, given as ``hub_kwargs``).

    Built from the index file alone (``model.safetensors.index.json``, or the header of a single
    ``model.safetensors``). A shard is resolved (downloaded, for a hub id not yet cached) and its header read
    only when a tensor of it is read: a rank that reads one stage touches only that stage's shards
    (``files_used`` lists them). Example::

        index = CheckpointIndex("path/to/model")          # or CheckpointIndex("org/name", revision="main")
        index.missing(["model.embed_tokens.weight"])      # [] when present
        index.read_into({"model.norm.weight": stage.model.norm.weight})
    """

    def __init__(self, source: str, **hub_kwargs):
        self.directory = self.source = os.fspath(source)
        self.hub_kwargs = hub_kwargs
        self.files_used: set[str] = set()
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        index_path = self._resolve(INDEX_FILE, required=False)
        if index_path is not None:
            with open(index_path) as f:
                self._file_of: dict[str, str] = dict(json.load(f)["weight_map"])
            return
        if self._resolve(SINGLE_FILE, required=False) is None:
            raise PipelineConfigError(
                f"{self.source!r} has no {SINGLE_FILE} or {INDEX_FILE}. Per-stage loading reads safetensors only: "
                "re-save the model with save_pretrained() (safetensors is its default)."
            )
        self._file_of = dict.fromkeys(self._header(SINGLE_FILE), SINGLE_FILE)

    def _resolve(self, filename: str, required: bool = True) -> str | None:
        """The local path of one file of the checkpoint (from the hub cache, downloading it when allowed)."""
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(self.source, filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **self.hub_kwargs)
        except OSError as error:
            raise PipelineConfigError(f"Cannot resolve {filename} of {self.source!r}: {error}") from None
        if path is None and required:
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
            how = ("this machine is offline (HF_HUB_OFFLINE=1): fetch it where the hub is reachable, e.g. "
                   f"`hf download {self.source}`, into the same cache" if offline else
                   "check the model id, revision and token, or pass a local save_pretrained() directory")
            raise PipelineConfigError(f"{filename} of {self.source!r} is not in the hub cache nor on disk; {how}.")
        return path

    def _header(self, filename: str) -> dict[str, TensorEntry]:
        if filename not in self._headers:
            path = self._resolve(filename)
            if not os.path.isfile(path):
                raise PipelineConfigError(f"{self.source!r}: the index names {filename}, which is not there.")
            self.files_used.add(filename)
            self._headers[filename] = read_header(path)
        return self._headers[filename]

    def _entry(self, key: str) -> TensorEntry:
        entry = self._header(self._file_of[key]).get(key)
        if entry is None:
            raise PipelineConfigError(f"{self.source!r}: the index puts {key!r} in {self._file_of[key]}, which lacks it.")
        return entry

    @property
    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor's entry (reads every shard's header: for inspection, not per-stage loading)."""
        return {key: self._entry(key) for key in self._file_of}

    def keys(self) -> list[str]:
        """The checkpoint's tensor names, from the index alone."""
        return list(self._file_of)

    def file_of(self, key: str) -> str:
        """The shard file (name inside the checkpoint) that holds ``key``."""
        return self._file_of[key]

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in order) this checkpoint does not hold."""
        return [k for k in keys if k not in self._file_of]

    def read_tensor(self, key: str) -> torch.Tensor:
        """One tensor, as stored (dtype and shape), into new CPU memory."""
        entry = self._entry(key)
        target = torch.empty(entry.shape, dtype=entry.dtype)
        with open(entry.path, "rb", buffering=0) as f:
            _read_tensor(f, entry, target)
        return target

    def read_into(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill each target tensor from the checkpoint tensor named by its key (casting dtype if needed).

        Files are opened once each and read in offset order. A target on the
        CPU with the checkpoint's dtype is filled in place without any staging
        copy; otherwise one tensor at a time is staged on the CPU.
        """
        missing = self.missing(targets)
        if missing:
            raise PipelineConfigError(f"{self.source!r} lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
        by_file: dict[str, list[tuple[TensorEntry, torch.Tensor, str]]] = {}
        for key, target in targets.items():
            entry = self._entry(key)
            if tuple(target.shape) != entry.shape:
                raise PipelineConfigError(
                    f"{self.source!r}: {key!r} has shape {list(entry.shape)} but the model expects "
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
