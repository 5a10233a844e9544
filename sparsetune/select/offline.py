"""Masks for a transformers model folder and a text-classification data set, in one call.

This is what ``sparsetune mask`` runs: load the task (a name from
:data:`sparsetune.data.TASKS` or ``csv:FILE``), load the model with a head for its labels,
tokenize the training split into seeded shuffled batches, and :func:`select`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .._checks import check_density
from ..data import load_task_spec
from ..errors import InvalidArgumentError
from ..mask import Mask
from .registry import method_spec, select

__all__ = ["load_task_spec", "select_for_task"]


def select_for_task(
    method: str,
    density: float | None = None,
    *,
    model: str | Path | None = None,
    data: str | None = None,
    scope: str = "global",
    seed: int = 0,
    num_batches: int | None = None,
    batch_size: int = 16,
    max_length: int = 64,
    max_examples: int | None = None,
    num_labels: int | None = None,
    always_train: Iterable[str] | None = None,
    targets: str | Iterable[str] | None = None,
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
) -> tuple[Mask, nn.Module]:
    """Select a mask of ``model`` (a local transformers folder; None: the embedded MiniLM).

    Args:
        data: a task name or ``"csv:FILE"``; needed by data-driven methods, and otherwise
            only used for its number of labels (``num_labels``, default 2, when absent).
        num_batches: batches of the training split the method reads (``num_batches`` of
            gradient methods, ``steps`` of fine-tuning ones; None: the method's default).
        batch_size, max_length: tokenized batches (shuffled with ``seed``).
        always_train: names trained in full, outside the budget (None: the classifier head).
        targets: the parameters allowed to receive entries: peft-style module names
            (``["query", "value"]``), ``"all-linear"``, or regexes (see :func:`select`).
        options: further method options (see :func:`select`).

    Returns:
        The mask and the model it was computed on (unchanged), to save with ``model=``.
    """
    from ..data import HEAD_PARAMETERS, batches, load_pretrained

    spec = method_spec(method)
    spec.refuse_if_per_step()
    if spec.uses_density:
        if density is None:
            raise InvalidArgumentError(f"method {method!r} needs a density in (0, 1]")
        check_density(density)
    elif density is not None:
        raise InvalidArgumentError(
            f"method {method!r} selects by rule and takes no density (got density={density!r})"
        )
    opts = dict(options or {})
    if num_batches is not None:
        if spec.count_option is None:
            raise InvalidArgumentError(
                f"method {method!r} reads no batches, so num_batches={num_batches!r} does not "
                f"apply"
            )
        opts[spec.count_option] = num_batches
    if "progress" in spec.option_names():
        opts.setdefault("progress", progress)
    # every option is checked here, before the model and the data are loaded
    needs_data = spec.from_options(opts).needs_data
    if needs_data and data is None:
        raise InvalidArgumentError(
            f"method {method!r} is data-driven: give data (a task name or csv:FILE)"
        )
    task = load_task_spec(data, seed=seed, max_examples=max_examples) if data else None
    if task is not None and num_labels is not None and num_labels != task.num_labels:
        raise InvalidArgumentError(
            f"num_labels={num_labels} but data {data!r} has {task.num_labels} labels"
        )
    labels = task.num_labels if task is not None else (num_labels or 2)
    network, tokenizer = load_pretrained(model, num_labels=labels, seed=seed)
    if always_train is None:
        names = dict(network.named_parameters())
        always_train = [n for n in HEAD_PARAMETERS if n in names]
    train = None
    if needs_data:
        if tokenizer is None:
            raise InvalidArgumentError(
                f"model folder {str(model)!r} has no tokenizer, which method {method!r} needs "
                f"to read the data"
            )
        train = batches(task.train, tokenizer, batch_size=batch_size, max_length=max_length,
                        shuffle=True, seed=seed)
    mask = select(network, method, density, data=train, scope=scope, seed=seed,
                  always_train=always_train, targets=targets, **opts)
    return mask, network
