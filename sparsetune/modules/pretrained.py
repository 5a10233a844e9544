"""An attached delta as a peft-style folder: ``adapter_config.json`` and safetensors files.

peft 0.21 cannot take a third-party tuner: ``peft.utils.register_peft_method`` accepts only a
name already in its closed ``PeftType`` enum ("Unknown PEFT type"), and
``PeftConfig.from_pretrained`` looks the saved ``peft_type`` up in the mapping filled by that
registration. Adding an enum member would take private enum internals. So a sparse delta
saves in peft's folder layout with its own type and loads with
:meth:`DeltaHandle.from_pretrained <sparsetune.modules.DeltaHandle.from_pretrained>` (peft
itself refuses the folder: KeyError 'SPARSE'). The folder holds

* ``adapter_config.json``: peft's keys (``peft_type: "SPARSE"``, ``base_model_name_or_path``,
  ``target_modules``: the layer names) and sparsetune's (``format_version``, the adapter
  ``name``, ``target_parameters``, ``density`` over the base parameters, ``num_entries``,
  ``base_fingerprint``, the sparsetune version that wrote it);
* ``sparse_delta.safetensors``: the delta as :meth:`DeltaHandle.to_delta
  <sparsetune.modules.DeltaHandle.to_delta>` gives it (the :class:`~sparsetune.SparseDelta`
  file: ``sparsetune delta apply`` and ``SparseDelta.load`` read it);
* ``sparse_values.safetensors`` (kind ``"delta_values"``): the trained values v themselves
  (float32; float64 over a float64 base), one 1-D tensor per parameter. The delta file keeps
  theta = theta0 + v rounded to the weight's dtype, from which v comes back only to rounding;
  with the values the loaded module computes bit for bit what the saved one did.

Each file is written atomically (:mod:`sparsetune.files.atomic`), the config last; loading
checks that the three agree (fingerprint, parameters, counts, and theta0 + v = theta at every
entry), so a folder whose rewrite was interrupted is refused rather than half loaded.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import Tensor

from ..delta import SparseDelta
from ..errors import FileFormatError
from ..files import (
    FORMAT_VERSION,
    atomic_save_safetensors,
    atomic_write,
    check_writable,
    load_delta,
    read_metadata,
    save_delta,
)
from ..files.table import read_tensors
from .slot import merged_weight_values

__all__ = ["CONFIG_NAME", "DELTA_NAME", "PEFT_TYPE", "VALUES_NAME", "read_folder",
           "write_folder"]

CONFIG_NAME = "adapter_config.json"
DELTA_NAME = "sparse_delta.safetensors"
VALUES_NAME = "sparse_values.safetensors"
PEFT_TYPE = "SPARSE"
_VALUES_KIND = "delta_values"
_REQUIRED = ("peft_type", "format_version", "name", "num_entries", "base_fingerprint",
             "target_parameters")


def _sparsetune_version() -> str:
    try:
        return version("sparsetune")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        return "0.0.0"


def write_folder(
    folder: str | os.PathLike, delta: SparseDelta, values: dict[str, Tensor], *, name: str,
    target_modules: list[str], num_base_entries: int, base_model_name_or_path: str | None,
) -> Path:
    """Write the folder (module docstring) for ``delta`` and its trained ``values`` (by
    parameter name); returns the folder."""
    folder = Path(folder)
    check_writable(folder, folder=True)
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": target_modules,
        "format_version": FORMAT_VERSION,
        "sparsetune_version": _sparsetune_version(),
        "name": name,
        "target_parameters": list(values),
        "density": delta.num_entries / num_base_entries if num_base_entries else 0.0,
        "num_entries": delta.num_entries,
        "base_fingerprint": delta.base_fingerprint,
    }
    metadata = {"format_version": FORMAT_VERSION, "kind": _VALUES_KIND,
                "base_fingerprint": delta.base_fingerprint}
    atomic_save_safetensors({n: v.detach() for n, v in values.items()}, folder / VALUES_NAME,
                            metadata)
    save_delta(delta, folder / DELTA_NAME)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileFormatError(f"{folder}: not a sparse delta folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise FileFormatError(f"{path}: expected a JSON object")
    if config.get("peft_type") != PEFT_TYPE:
        raise FileFormatError(f"{path}: peft_type {config.get('peft_type')!r} is not "
                              f"{PEFT_TYPE!r} (a peft adapter: load it with peft)")
    if config.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{path}: format_version {config.get('format_version')!r} is not "
                              f"supported (this sparsetune reads version {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise FileFormatError(f"{path}: damaged config (missing {missing})")
    return config


def _same(a: Tensor, b: Tensor) -> bool:
    """Bit-level agreement of two float tensors (NaN equals NaN)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def read_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, Any], SparseDelta, dict[str, Tensor]]:
    """(config, delta, values by parameter name) of a folder :func:`write_folder` wrote, after
    checking that its files agree; any disagreement is one :class:`FileFormatError`."""
    folder = Path(folder)
    config = _read_config(folder)
    delta = load_delta(folder / DELTA_NAME)
    values_path = folder / VALUES_NAME
    metadata = read_metadata(values_path, _VALUES_KIND)
    values = read_tensors(values_path, set(delta.entries))
    wrong = [k for k, found in (("base_fingerprint", delta.base_fingerprint),
                                ("num_entries", delta.num_entries),
                                ("target_parameters", list(delta.entries)))
             if config[k] != found]
    if metadata.get("base_fingerprint") != delta.base_fingerprint:
        wrong.append(f"{VALUES_NAME} base_fingerprint")
    for pname, e in delta.entries.items():
        v = values[pname]
        if (v.shape != e.base.shape or not v.dtype.is_floating_point
                or not _same(merged_weight_values(e.base, v), e.tuned)):
            wrong.append(f"values of {pname}")
    if wrong:
        raise FileFormatError(f"{folder}: the files of this folder disagree on {wrong} (an "
                              f"interrupted save?); save the delta again")
    return config, delta, values
