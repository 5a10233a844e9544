"""Delta workflows on files and local transformers folders (what ``sparsetune delta`` runs).

:func:`extract_from_pretrained` makes a delta from a base folder, a tuned folder and a mask
file; :func:`apply_to_pretrained` applies a delta to a base folder and writes a new one;
:func:`merge_delta_files` merges delta files into one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import load_pretrained, save_pretrained
from ..delta import DEFAULT_DENSITY, MERGE_POLICIES, SparseDelta, merge_deltas
from ..errors import FileFormatError, InvalidArgumentError
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
    paths: list[str | os.PathLike], output: str | os.PathLike, *, policy: str = "sum",
    density: float | None = None, seed: int | None = None,
) -> tuple[Path, SparseDelta]:
    """Load the delta files ``paths``, merge them (:func:`sparsetune.merge_deltas`) and write the
    result to ``output``; returns the path written and the merged delta.

    ``density`` and ``seed`` go to the sparse policies (``"ties"`` takes ``density``,
    ``"dare"`` both; None: their defaults); given with a policy that ignores them they are an
    error, as is a density outside (0, 1]. Arguments and ``output`` are checked before any
    file is read.
    """
    if policy not in MERGE_POLICIES:
        raise InvalidArgumentError(f"policy must be one of {list(MERGE_POLICIES)}, got {policy!r}")
    given = {"density": density, "seed": seed}
    takes = {"density": policy in DEFAULT_DENSITY, "seed": policy == "dare"}
    unused = [f"{k}={v!r}" for k, v in given.items() if v is not None and not takes[k]]
    if unused:
        raise InvalidArgumentError(f"policy={policy!r} does not use {' or '.join(unused)}: "
                                   f"density is for 'ties' and 'dare', seed for 'dare' only")
    if density is not None and not 0.0 < density <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}")
    check_writable(output)
    options = {k: v for k, v in given.items() if v is not None}
    merged = merge_deltas([SparseDelta.load(p) for p in paths], policy=policy, **options)
    return merged.save(output), merged
