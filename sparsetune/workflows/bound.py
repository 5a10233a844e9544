"""The stability and generalisation bounds (theory/ E3, E4) of a model and mask on a task, with
the constants measured on a slice of its training split (what ``sparsetune bound`` runs)."""

from __future__ import annotations

import os

from ..bounds import BoundReport, diagnose
from ..data import Split, batches, load_pretrained, load_task_spec
from ..delta import SparseDelta
from ..errors import InvalidArgumentError
from ..mask import Mask

__all__ = ["diagnose_for_task"]


def diagnose_for_task(
    data: str,
    mask: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    delta: str | os.PathLike | None = None,
    num_examples: int = 16,
    n: int | None = None,
    lam: float = 1.0,
    failure_probability: float = 0.05,
    tol: float = 1e-2,
    max_length: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> BoundReport:
    """:func:`sparsetune.bounds.diagnose` of a model and a mask file on a task.

    Args:
        data: a task of :data:`sparsetune.data.TASKS` or ``"csv:FILE"`` (columns text, label),
            split with ``seed``.
        mask: a mask file of the model.
        model: a local transformers sequence-classification folder; None: the embedded
            all-MiniLM-L6-v2 with a head drawn from ``seed``. Loaded with eager attention
            (Hessian-vector products need it).
        delta: a sparse delta file applied to the model first (e.g. the fine-tuned model's).
        num_examples: the first training examples the constants are measured on.
        n: training examples in the bounds (None or 0: the training split's size).
        lam, failure_probability, tol: the lambda of 2 lam (1 - p), delta of E4, and the
            relative accuracy of Lanczos.
        max_length, batch_size: tokenized batches of the ``num_examples`` examples.
    """
    if num_examples < 1:
        raise InvalidArgumentError(f"--num-examples must be >= 1, got {num_examples}")
    task = load_task_spec(data, seed=seed)
    network, tokenizer = load_pretrained(model, num_labels=task.num_labels, seed=seed,
                                         attn_implementation="eager")
    if tokenizer is None:
        shown = "embedded" if model is None else str(model)
        raise InvalidArgumentError(f"--model {shown!r} has no tokenizer files")
    if delta:
        SparseDelta.load(delta).apply_to(network)
    selected = Mask.load(mask, model=network)
    k = min(num_examples, len(task.train))
    sample = Split(task.train.texts[:k], task.train.labels[:k])
    return diagnose(
        network, None, batches(sample, tokenizer, batch_size=batch_size, max_length=max_length),
        selected, n=n or len(task.train), lam=lam, delta=failure_probability, tol=tol,
        progress=progress,
    )
