"""The one codec every sparsetune file shares: a versioned header and a parameter table.

Each file is a safetensors file whose string metadata holds ``format_version``, ``kind`` and
``parameters``: a JSON list of ``[name, shape, encoding]`` rows, one per parameter, in order.
The encoding says which tensors the row owns (``"idx"``: flat indices ``idx:<name>``, int32
below 2^31 entries else int64; ``"bits"``: packed bits; ``"dense"``: every entry). Reading is
strict: the tensors present must be exactly those the table (and the kind's fixed tensors) name.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import FileFormatError

__all__ = [
    "FORMAT_VERSION",
    "Row",
    "check_indices",
    "check_regular_file",
    "decode_table",
    "encode_table",
    "index_dtype",
    "json_field",
    "read_kind",
    "read_metadata",
    "read_tensors",
]

FORMAT_VERSION = "1"

Row = tuple[str, tuple[int, ...], str]
"""One parameter-table row: (name, shape, encoding)."""


def index_dtype(numel: int) -> torch.dtype:
    """int32 for a tensor of fewer than 2^31 entries, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def encode_table(rows: Iterable[Row]) -> str:
    """The ``parameters`` metadata value for ``rows``."""
    return json.dumps([[name, [int(d) for d in shape], enc] for name, shape, enc in rows])


def decode_table(path: str | os.PathLike, metadata: Mapping[str, str]) -> list[Row]:
    """The rows of ``metadata["parameters"]``; damaged metadata raises :class:`FileFormatError`."""
    rows = json_field(path, metadata, "parameters")
    if not isinstance(rows, list):
        raise FileFormatError(f"{path}: damaged metadata (parameters is not a list)")
    try:
        return [(str(name), tuple(int(d) for d in shape), str(enc)) for name, shape, enc in rows]
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc


def json_field(path: str | os.PathLike, metadata: Mapping[str, str], key: str,
               default: str | None = None) -> object:
    """``json.loads(metadata[key])`` (``default`` when absent and given), else FileFormatError."""
    try:
        text = metadata[key] if default is None else metadata.get(key, default)
        return json.loads(text)
    except (KeyError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse a directory, a device (``/dev/null``) or a pipe as a file to read, in one line.

    A path that does not exist is left for the reader to report (``FileNotFoundError``).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe or socket")
        raise FileFormatError(f"{path} is not a regular file (it is {what})")


def read_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` a safetensors file declares (None when it declares none)."""
    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("kind")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_metadata(path: str | os.PathLike, kind: str) -> dict[str, str]:
    """The metadata of a sparsetune file, after checking its kind and version."""
    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    if metadata.get("kind") != kind:
        raise FileFormatError(
            f"{path}: expected a sparsetune {kind} file, found kind={metadata.get('kind')!r}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format_version {metadata.get('format_version')!r} is not supported "
            f"(this sparsetune reads version {FORMAT_VERSION})"
        )
    return metadata


def read_tensors(path: str | os.PathLike, expected: set[str]) -> dict[str, Tensor]:
    """Every tensor of the file, after checking that its keys are exactly ``expected``."""
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        if present != expected:
            raise FileFormatError(
                f"{path}: tensors do not match the listed parameters; missing "
                f"{sorted(expected - present)}, unexpected {sorted(present - expected)}"
            )
        return {key: f.get_tensor(key) for key in sorted(present)}


def check_indices(index: Tensor | None, shape: tuple[int, ...]) -> bool:
    """Whether every flat index lies in a tensor of ``shape`` (None: every entry, always true)."""
    numel = math.prod(shape)
    return index is None or not index.numel() or (
        int(index.min()) >= 0 and int(index.max()) < numel
    )
