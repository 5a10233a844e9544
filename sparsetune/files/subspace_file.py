"""Versioned safetensors files for :class:`~sparsetune.subspace.Subspace` (kind ``"subspace"``).

Fixed tensors: ``coordinates`` (n x d float64, the fitted coordinates of each solution) and
``reconstruction_error`` (n, float64). Per parameter of the table: ``basis:<name>`` (the rows of
U on its covered entries, (count, d)) and, for the ``"idx"`` encoding, ``idx:<name>`` (the flat
indices covered); ``"dense"`` rows cover every entry. Metadata: ``method``, ``dim``, ``labels``
(a JSON list), ``base_fingerprint``, ``fit_history`` (a JSON list of the joint objective).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FileFormatError
from ..subspace.layout import Layout
from ..subspace.space import Subspace
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

__all__ = ["load_subspace", "save_subspace"]


def save_subspace(space: Subspace, path: str | os.PathLike) -> Path:
    """Write ``space`` to ``path`` atomically; returns the path written."""
    tensors: dict[str, Tensor] = {
        "coordinates": space.coordinates.contiguous(),
        "reconstruction_error": space.reconstruction_error.to(torch.float64),
    }
    rows = []
    for name, shape in space.layout.shapes.items():
        tensors[f"basis:{name}"] = space.basis(name)
        idx = space.index(name)
        if idx is not None:
            tensors[f"idx:{name}"] = idx.to(index_dtype(math.prod(shape)))
        rows.append((name, shape, "dense" if idx is None else "idx"))
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "subspace",
        "method": space.method,
        "dim": str(space.dim),
        "labels": json.dumps(space.labels),
        "base_fingerprint": space.base_fingerprint,
        "parameters": encode_table(rows),
        "fit_history": json.dumps(space.fit_history),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def load_subspace(path: str | os.PathLike) -> Subspace:
    """Read a subspace file strictly: every listed tensor present and consistent."""
    metadata = read_metadata(path, "subspace")
    rows = decode_table(path, metadata)
    labels = json_field(path, metadata, "labels")
    try:
        dim = int(metadata["dim"])
        fingerprint = metadata["base_fingerprint"]
    except (KeyError, ValueError) as exc:
        raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc
    history = json_field(path, metadata, "fit_history", "[]")
    expected = {"coordinates", "reconstruction_error"}
    for name, _, encoding in rows:
        expected.add(f"basis:{name}")
        if encoding == "idx":
            expected.add(f"idx:{name}")
    stored = read_tensors(path, expected)
    coordinates, error = stored["coordinates"], stored["reconstruction_error"]
    shapes, index, basis = {}, {}, {}
    for name, shape, encoding in rows:
        idx = stored[f"idx:{name}"].long() if encoding == "idx" else None
        u = stored[f"basis:{name}"]
        count = math.prod(shape) if idx is None else idx.numel()
        if u.shape != (count, dim) or not check_indices(idx, shape):
            raise FileFormatError(f"{path}: entries of '{name}' are inconsistent")
        shapes[name], index[name], basis[name] = shape, idx, u
    if coordinates.shape != (len(labels), dim) or error.shape != (len(labels),):
        raise FileFormatError(f"{path}: coordinates do not match {len(labels)} labels")
    space = Subspace(Layout(shapes, index), basis, coordinates, labels,
                     metadata.get("method", "unknown"), fingerprint)
    space.reconstruction_error = error
    space.fit_history = history  # type: ignore[assignment]
    return space
