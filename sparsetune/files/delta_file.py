"""Versioned safetensors files for :class:`~sparsetune.SparseDelta` (kind ``"delta"``).

Per parameter of the table: ``base:<name>`` and ``tuned:<name>`` (theta0 and theta on the support,
1-D, in the parameter's dtype) and, for the ``"idx"`` encoding, ``idx:<name>`` (flat indices);
``"dense"`` rows cover every entry. Metadata: ``method``, ``base_fingerprint``, ``num_entries``,
optional ``info`` (a JSON object of strings).

A delta that records changed buffers (:attr:`SparseDelta.buffers`) adds the metadata key
``buffers``, a second table in the same codec whose rows are all ``"dense"``, and per buffer
``buffer_base:<name>`` and ``buffer_tuned:<name>``. A delta without changed buffers writes
neither, so its file is exactly what earlier versions wrote; earlier readers refuse a file with
buffers (unexpected tensors) rather than silently drop them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..delta import DeltaEntry, SparseDelta
from ..errors import FileFormatError
from .atomic import atomic_save_safetensors
from .table import (
    FORMAT_VERSION,
    check_indices,
    decode_table,
    encode_table,
    index_dtype,
    json_field,
    read_metadata,
    read_tensors,
)

__all__ = ["load_delta", "save_delta"]


def save_delta(delta: SparseDelta, path: str | os.PathLike) -> Path:
    """Write ``delta`` to ``path`` atomically; returns the path written."""
    tensors, rows = {}, []
    for name, e in delta.entries.items():
        tensors[f"base:{name}"] = e.base.detach().cpu()
        tensors[f"tuned:{name}"] = e.tuned.detach().cpu()
        if e.index is not None:
            tensors[f"idx:{name}"] = e.index.detach().cpu().to(index_dtype(e.numel))
        rows.append((name, e.shape, "dense" if e.index is None else "idx"))
    buffer_rows = []
    for name, e in delta.buffers.items():
        tensors[f"buffer_base:{name}"] = e.base.detach().cpu()
        tensors[f"buffer_tuned:{name}"] = e.tuned.detach().cpu()
        buffer_rows.append((name, e.shape, "dense"))
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "delta",
        "method": delta.method,
        "base_fingerprint": delta.base_fingerprint,
        "num_entries": str(delta.num_entries),
        "parameters": encode_table(rows),
    }
    if delta.info:
        metadata["info"] = json.dumps(delta.info, sort_keys=True)
    if buffer_rows:
        metadata["buffers"] = encode_table(buffer_rows)
    return atomic_save_safetensors(tensors, path, metadata)


def load_delta(path: str | os.PathLike) -> SparseDelta:
    """Read a delta file strictly: every listed tensor present, nothing else."""
    metadata = read_metadata(path, "delta")
    rows = decode_table(path, metadata)
    info = json_field(path, metadata, "info", "{}")
    if "base_fingerprint" not in metadata:
        raise FileFormatError(f"{path}: damaged metadata ('base_fingerprint' is missing)")
    # the buffers table has the parameter table's codec, under its own key
    buffer_rows = decode_table(path, {"parameters": metadata["buffers"]}) if (
        "buffers" in metadata) else []
    if any(encoding != "dense" for _, _, encoding in buffer_rows):
        raise FileFormatError(f"{path}: damaged metadata (buffers must be dense rows)")
    expected = {f"buffer_{part}:{name}" for name, _, _ in buffer_rows for part in ("base", "tuned")}
    for name, _, encoding in rows:
        expected |= {f"base:{name}", f"tuned:{name}"}
        if encoding == "idx":
            expected.add(f"idx:{name}")
    stored = read_tensors(path, expected)
    entries = {}
    for name, shape, encoding in rows:
        base, tuned = stored[f"base:{name}"], stored[f"tuned:{name}"]
        index = stored[f"idx:{name}"].long() if encoding == "idx" else None
        entry = DeltaEntry(shape, index, base, tuned)
        count = entry.numel if index is None else index.numel()
        if base.shape != (count,) or tuned.shape != (count,) or not check_indices(index, shape):
            raise FileFormatError(f"{path}: entries of '{name}' are inconsistent")
        entries[name] = entry
    buffers = {}
    for name, shape, _ in buffer_rows:
        entry = DeltaEntry(shape, None, stored[f"buffer_base:{name}"],
                           stored[f"buffer_tuned:{name}"])
        if entry.base.shape != (entry.numel,) or entry.tuned.shape != (entry.numel,):
            raise FileFormatError(f"{path}: values of buffer '{name}' are inconsistent")
        buffers[name] = entry
    return SparseDelta(entries, metadata["base_fingerprint"], metadata.get("method", "unknown"),
                       info, buffers)  # type: ignore[arg-type]
