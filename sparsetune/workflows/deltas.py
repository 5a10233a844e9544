"""Delta workflows on files and local transformers folders (what ``sparsetune delta`` runs).

:func:`extract_from_pretrained` makes a delta from a base folder, a tuned folder and a mask
file; :func:`apply_to_pretrained` applies a delta to a base folder and writes a new one;
:func:`merge_delta_files` merges delta files into one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import load_pretrained, save_pretrained
from ..delta import SparseDelta, merge_deltas
from ..errors import FileFormatError
from ..files import check_writable, load_mask, read_metadata

__all__ = ["apply_to_pretrained", "extract_from_pretrained", "merge_delta_files"]


def extract_from_pretrained(
    base: str | os.PathLike | None,
    tuned: str | os.PathLike,
    mask: str | os.PathLike,
    *,
    seed: int = 0,
    strict: bool = True,
    output: str | os.PathLike | None = None,
) -> SparseDelta:
    """The delta between two local transformers folders, on the entries of a mask file.

    ``tuned`` is loaded as saved; ``base`` (None: the embedded MiniLM) is loaded as the same
    architecture and number of labels, a head it lacks drawn from ``seed`` exactly as
    :func:`sparsetune.data.load_model` does. The mask must fit the base (its fingerprint is
    checked when it has one). The architecture, labels and seed travel in :attr:`SparseDelta.info`
    so that :func:`apply_to_pretrained` rebuilds the same base. With ``output`` the delta is also
    saved there; that path is checked before any model is loaded.
    """
    check_writable(output)
    tuned_model, _ = load_pretrained(tuned)
    architecture = type(tuned_model).__name__
    num_labels = int(tuned_model.config.num_labels)
    base_model, _ = load_pretrained(base, architecture=architecture, num_labels=num_labels,
                                    seed=seed)
    selected = load_mask(mask, model=base_model)
    method = read_metadata(mask, "mask").get("method", "unknown")
    info = {"architecture": architecture, "num_labels": str(num_labels), "seed": str(seed)}
    delta = SparseDelta.extract(tuned_model, base_model.state_dict(), selected, method=method,
                                strict=strict, info=info)
    if output is not None:
        delta.save(output)
    return delta


def apply_to_pretrained(
    base: str | os.PathLike | None,
    delta: str | os.PathLike | SparseDelta,
    output: str | os.PathLike,
    *,
    scale: float = 1.0,
) -> Path:
    """Load ``base`` (None: the embedded MiniLM) as the delta's architecture, apply the delta,
    and save the tuned model (and the base's tokenizer) as a new transformers folder ``output``.

    The base fingerprint is checked before anything is written; on failure no folder is left.
    ``output`` is checked first (a folder, or a path whose parent may be written).
    """
    check_writable(output, folder=True)
    if not isinstance(delta, SparseDelta):
        delta = SparseDelta.load(delta)
    info = delta.info
    try:
        num_labels = int(info["num_labels"]) if "num_labels" in info else None
        seed = int(info.get("seed", 0))
    except ValueError as exc:
        raise FileFormatError(f"delta info is damaged: {info}") from exc
    model, tokenizer = load_pretrained(base, architecture=info.get("architecture"),
                                       num_labels=num_labels, seed=seed)
    delta.apply_to(model, scale=scale)
    return save_pretrained(model, output, tokenizer)


def merge_delta_files(
    paths: list[str | os.PathLike], output: str | os.PathLike, *, policy: str = "sum"
) -> tuple[Path, SparseDelta]:
    """Load the delta files ``paths``, merge them (:func:`sparsetune.merge_deltas`) and write the
    result to ``output`` (checked before any file is read); returns the path written and the
    merged delta."""
    check_writable(output)
    merged = merge_deltas([SparseDelta.load(p) for p in paths], policy=policy)
    return merged.save(output), merged
