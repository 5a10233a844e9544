"""A readable description of any sparsetune file (what ``sparsetune info`` prints)."""

from __future__ import annotations

import os

from ..delta import SparseDelta
from ..errors import FileFormatError
from .mask_file import load_mask
from .table import FORMAT_VERSION, read_kind, read_metadata

__all__ = ["describe_file"]


def describe_file(path: str | os.PathLike) -> str:
    """A readable description of a sparsetune mask or delta file."""
    kind = read_kind(path)
    if kind == "mask":
        metadata = read_metadata(path, "mask")
        mask = load_mask(path)
        made_for = (
            f", made for {metadata.get('model_class', '?')} "
            f"(fingerprint {metadata['model_fingerprint'][:16]}...)"
            if "model_fingerprint" in metadata
            else ""
        )
        options = f", options {metadata['options']}" if "options" in metadata else ""
        return (
            f"{path}: sparsetune mask, format {metadata['format_version']}, "
            f"method {metadata.get('method', 'unknown')!r}{options}{made_for}\n"
            f"{mask.summary(max_rows=None)}"
        )
    if kind == "delta":
        delta = SparseDelta.load(path)
        return (
            f"{path}: sparsetune delta, format {FORMAT_VERSION}\n"
            f"{delta.summary(max_rows=None)}"
        )
    raise FileFormatError(f"{path}: not a sparsetune mask or delta file (kind={kind!r})")
