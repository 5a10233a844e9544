"""Versioned safetensors files for masks: compact, strict on load, written atomically.

A mask file holds one tensor per parameter, in whichever encoding is smaller:

* ``"idx:<name>"``: int32 (or int64) sorted flat indices of the selected entries;
* ``"bits:<name>"``: the entries packed 8 per byte (``numpy.packbits``, big-endian bit order).

String metadata: ``format_version``, ``kind`` (``"mask"``), ``method``, optionally ``options``
(JSON object of the selection's arguments, for the record only), ``density``,
``num_selected``, ``num_total``, ``always_train`` and ``parameters`` (JSON lists), and
``mask_digest`` (:meth:`Mask.digest`, checked on load). Nothing is pickled.

Saved with ``model=``, a mask file also records the model it was made for:
``model_fingerprint`` (:func:`model_fingerprint`: SHA-256 of the model's parameter names and
shapes, not their values, because a mask describes positions: it stays valid for every
fine-tuned copy and every dtype of the same architecture), ``model_class``, and
``model_other_parameters`` (names and shapes of the model's parameters the mask does not list,
usually none). ``load_mask(path, model=...)`` then refuses a model whose names or shapes differ,
listing every missing, unexpected and mis-shaped parameter in one error. These keys are
optional: files written without them (by older versions too) load as before, with the mask's own
names and shapes checked against the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import (
    FileFormatError,
    InvalidArgumentError,
    InvalidMaskError,
    ParameterMismatchError,
)
from ..mask import Mask
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

__all__ = ["load_mask", "model_fingerprint", "save_mask"]


def _encode(mask: Mask, name: str) -> tuple[str, Tensor]:
    """The smaller of the two encodings, read from the mask's compact form (no bool tensor)."""
    numel = mask.shape(name).numel()
    dtype = index_dtype(numel)
    if mask.count(name) * (4 if dtype == torch.int32 else 8) <= (numel + 7) // 8:
        return "idx", mask.indices(name).cpu().to(dtype)
    return "bits", mask.packed_bits(name).cpu()


def _decode(encoding: str, data: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    """Check one stored tensor; returns it as indices or as packed bits (padding cleared)."""
    numel = int(np.prod(shape)) if shape else 1
    if encoding == "idx":
        if not check_indices(data, shape):
            raise FileFormatError(f"mask file: indices of '{name}' fall outside {numel} entries")
        return data
    if encoding == "bits":
        if data.dtype != torch.uint8 or data.numel() != (numel + 7) // 8:
            raise FileFormatError(f"mask file: '{name}' has {data.numel()} bytes for {numel} bits")
        if numel % 8:  # numpy.unpackbits(count=numel) ignored them: so do we
            data = data.clone()
            data[-1] &= (0xFF << (8 - numel % 8)) & 0xFF
        return data
    raise FileFormatError(f"mask file: unknown encoding {encoding!r} for '{name}'")


def _shapes(pairs: list[list]) -> str:
    return json.dumps(sorted([str(name), [int(d) for d in shape]] for name, shape in pairs))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the names and shapes of ``model.named_parameters()`` (values play no part)."""
    pairs = [[n, list(p.shape)] for n, p in model.named_parameters()]
    return hashlib.sha256(_shapes(pairs).encode()).hexdigest()


def save_mask(
    mask: Mask,
    path: str | os.PathLike,
    *,
    method: str = "unknown",
    model: nn.Module | None = None,
    options: Mapping[str, object] | None = None,
) -> Path:
    """Save ``mask`` to ``path`` (a ``.safetensors`` file); returns the path written.

    With ``model`` (which the mask must fit), the file records the model's fingerprint, so that
    loading it for another architecture fails (see the module docstring).
    """
    if not isinstance(mask, Mask):
        raise InvalidMaskError(f"save_mask expects a sparsetune.Mask, got {type(mask).__name__}")
    if model is not None:
        mask.check(model)
    tensors, rows = {}, []
    for name in mask:
        encoding, data = _encode(mask, name)
        tensors[f"{encoding}:{name}"] = data
        rows.append((name, tuple(mask.shape(name)), encoding))
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "mask",
        "method": str(method),
        "density": repr(mask.density),
        "num_selected": str(mask.num_selected),
        "num_total": str(mask.num_total),
        "always_train": json.dumps(sorted(mask.always_train)),
        "parameters": encode_table(rows),
        "mask_digest": mask.digest(),
    }
    if options is not None:
        try:
            metadata["options"] = json.dumps(dict(options), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"mask options must be JSON-encodable: {exc}") from exc
    if model is not None:
        metadata["model_fingerprint"] = model_fingerprint(model)
        metadata["model_class"] = type(model).__name__
        metadata["model_other_parameters"] = _shapes(
            [[n, list(p.shape)] for n, p in model.named_parameters() if n not in mask]
        )
    return atomic_save_safetensors(tensors, path, metadata)


def load_mask(path: str | os.PathLike, *, model: nn.Module | None = None) -> Mask:
    """Load a mask file strictly; with ``model``, also check names and shapes against it."""
    metadata = read_metadata(path, "mask")
    rows = decode_table(path, metadata)
    always_train = json_field(path, metadata, "always_train")
    stored = read_tensors(path, {f"{enc}:{name}" for name, _, enc in rows})
    data = {name: _decode(enc, stored[f"{enc}:{name}"], shape, name) for name, shape, enc in rows}
    encodings = {name: enc for name, _, enc in rows}
    mask = Mask.from_indices(  # no bool per entry: the stored form is the compact one
        {name: shape for name, shape, _ in rows},
        {n: d for n, d in data.items() if encodings[n] == "idx"},
        packed={n: d for n, d in data.items() if encodings[n] == "bits"},
        always_train=always_train,  # type: ignore[arg-type]
    )
    if mask.digest() != metadata.get("mask_digest"):
        raise FileFormatError(f"{path}: contents do not match the stored mask digest (damaged?)")
    if model is not None:
        if "model_fingerprint" in metadata:
            _check_model(path, metadata, rows, model)
        mask.check(model)
    return mask


def _check_model(path, metadata: dict[str, str], rows: list, model: nn.Module) -> None:
    """Refuse a model whose parameter names or shapes differ from those the mask was made for."""
    if model_fingerprint(model) == metadata["model_fingerprint"]:
        return
    others = json_field(path, metadata, "model_other_parameters", "[]")
    expected = {name: tuple(shape) for name, shape, _ in rows}
    expected.update({name: tuple(shape) for name, shape in others})  # type: ignore[union-attr]
    found = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    misshaped = [
        f"{n}: mask made for {expected[n]}, model has {found[n]}"
        for n in expected
        if n in found and expected[n] != found[n]
    ]
    raise ParameterMismatchError(
        f"{path}: this mask was made for another model ({metadata.get('model_class', '?')}, "
        f"fingerprint {metadata['model_fingerprint'][:12]}...; got {type(model).__name__}): "
        f"parameters the model lacks {missing}; parameters the mask's model did not have "
        f"{unexpected}; different shapes {misshaped}"
    )
