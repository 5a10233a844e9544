"""Versioned safetensors files for masks: compact, strict on load, written atomically.

A mask file holds one tensor per parameter, in whichever encoding is smaller:

* ``"idx:<name>"``: int32 (or int64) sorted flat indices of the selected entries;
* ``"bits:<name>"``: the entries packed 8 per byte (``numpy.packbits``, big-endian bit order).

String metadata: ``format_version``, ``kind`` (``"mask"``), ``method``, ``density``,
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
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import InvalidMaskError, ParameterMismatchError, SparsetuneError
from .mask import Mask

__all__ = [
    "FORMAT_VERSION",
    "FileFormatError",
    "describe_file",
    "load_mask",
    "model_fingerprint",
    "save_mask",
]

FORMAT_VERSION = "1"


class FileFormatError(SparsetuneError, ValueError):
    """A file is not a sparsetune file of the expected kind and version, or is damaged."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure leaves no partial file (the temporary one is removed) and ``path`` as it was.
    The file gets the permissions ``open()`` would give (mkstemp alone makes 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str]
) -> Path:
    """Write a safetensors file to a temporary name in the same folder, then rename it."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=dict(metadata)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _encode(selected: Tensor) -> tuple[str, Tensor]:
    flat = selected.detach().reshape(-1).cpu()
    count = int(flat.sum())
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    index_bytes = count * (4 if index_dtype == torch.int32 else 8)
    if index_bytes <= (flat.numel() + 7) // 8:
        return "idx", torch.nonzero(flat).squeeze(1).to(index_dtype)
    return "bits", torch.from_numpy(np.packbits(flat.numpy()))


def _decode(encoding: str, data: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    numel = int(np.prod(shape)) if shape else 1
    if encoding == "idx":
        if data.numel() and (int(data.min()) < 0 or int(data.max()) >= numel):
            raise FileFormatError(f"mask file: indices of '{name}' fall outside {numel} entries")
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[data.long()] = True
    elif encoding == "bits":
        if data.numel() != (numel + 7) // 8:
            raise FileFormatError(f"mask file: '{name}' has {data.numel()} bytes for {numel} bits")
        flat = torch.from_numpy(np.unpackbits(data.numpy(), count=numel).astype(bool))
    else:
        raise FileFormatError(f"mask file: unknown encoding {encoding!r} for '{name}'")
    return flat.reshape(shape)


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
) -> Path:
    """Save ``mask`` to ``path`` (a ``.safetensors`` file); returns the path written.

    With ``model`` (which the mask must fit), the file records the model's fingerprint, so that
    loading it for another architecture fails (see the module docstring).
    """
    if not isinstance(mask, Mask):
        raise InvalidMaskError(f"save_mask expects a sparsetune.Mask, got {type(mask).__name__}")
    if model is not None:
        mask.check(model)
    tensors, parameters = {}, []
    for name, selected in mask.items():
        encoding, data = _encode(selected)
        tensors[f"{encoding}:{name}"] = data
        parameters.append([name, list(selected.shape), encoding])
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "mask",
        "method": str(method),
        "density": repr(mask.density),
        "num_selected": str(mask.num_selected),
        "num_total": str(mask.num_total),
        "always_train": json.dumps(sorted(mask.always_train)),
        "parameters": json.dumps(parameters),
        "mask_digest": mask.digest(),
    }
    if model is not None:
        metadata["model_fingerprint"] = model_fingerprint(model)
        metadata["model_class"] = type(model).__name__
        metadata["model_other_parameters"] = _shapes(
            [[n, list(p.shape)] for n, p in model.named_parameters() if n not in mask]
        )
    return atomic_save_safetensors(tensors, path, metadata)


def read_metadata(path: str | os.PathLike, kind: str) -> dict[str, str]:
    """The metadata of a sparsetune file, after checking its kind and version."""
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


def describe_file(path: str | os.PathLike) -> str:
    """A readable description of a sparsetune mask or delta file (what ``sparsetune info`` prints).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("kind")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    if kind == "mask":
        metadata = read_metadata(path, "mask")
        mask = load_mask(path)
        made_for = (
            f", made for {metadata.get('model_class', '?')} "
            f"(fingerprint {metadata['model_fingerprint'][:16]}...)"
            if "model_fingerprint" in metadata
            else ""
        )
        return (
            f"{path}: sparsetune mask, format {metadata['format_version']}, "
            f"method {metadata.get('method', 'unknown')!r}{made_for}\n"
            f"{mask.summary(max_rows=None)}"
        )
    if kind == "delta":
        from .delta import SparseDelta

        delta = SparseDelta.load(path)
        return (
            f"{path}: sparsetune delta, format {FORMAT_VERSION}\n"
            f"{delta.summary(max_rows=None)}"
        )
    raise FileFormatError(f"{path}: not a sparsetune mask or delta file (kind={kind!r})")


def load_mask(path: str | os.PathLike, *, model: nn.Module | None = None) -> Mask:
    """Load a mask file strictly; with ``model``, also check names and shapes against it."""
    metadata = read_metadata(path, "mask")
    try:
        parameters = json.loads(metadata["parameters"])
        always_train = json.loads(metadata["always_train"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc
    expected = {f"{enc}:{name}" for name, _, enc in parameters}
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        if present != expected:
            raise FileFormatError(
                f"{path}: tensors do not match the listed parameters; missing "
                f"{sorted(expected - present)}, unexpected {sorted(present - expected)}"
            )
        tensors = {
            name: _decode(enc, f.get_tensor(f"{enc}:{name}"), tuple(shape), name)
            for name, shape, enc in parameters
        }
    mask = Mask(tensors, always_train=always_train)
    if mask.digest() != metadata.get("mask_digest"):
        raise FileFormatError(f"{path}: contents do not match the stored mask digest (damaged?)")
    if model is not None:
        if "model_fingerprint" in metadata:
            _check_model(path, metadata, parameters, model)
        mask.check(model)
    return mask


def _check_model(path, metadata: dict[str, str], parameters: list, model: nn.Module) -> None:
    """Refuse a model whose parameter names or shapes differ from those the mask was made for."""
    if model_fingerprint(model) == metadata["model_fingerprint"]:
        return
    try:
        others = json.loads(metadata.get("model_other_parameters", "[]"))
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: damaged metadata ({exc})") from exc
    expected = {name: tuple(shape) for name, shape, _ in parameters}
    expected.update({name: tuple(shape) for name, shape in others})
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
