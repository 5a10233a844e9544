"""Subspace workflows on files and the embedded MiniLM (what ``sparsetune subspace`` runs).

:func:`fit_subspace_files` fits a subspace to delta files and writes it; :func:`train_in_subspace`
trains only z on an offline task and scores theta(z) on its test split; :func:`subspace_landscape`
maps the validation loss on a plane of the subspace as a PNG. The base is the embedded MiniLM
with the task head drawn from ``model_seed``: the base the deltas must have been made over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from .. import data
from .._loss import transformers_loss
from ..delta import SparseDelta
from ..files import check_writable, load_delta, load_mask
from ..files.table import read_kind
from ..mask import Mask
from ..subspace import Landscape, Subspace, fit

__all__ = [
    "SubspaceTrainReport",
    "fit_subspace_files",
    "subspace_landscape",
    "train_in_subspace",
]


def fit_subspace_files(
    deltas: Sequence[str | os.PathLike],
    dim: int,
    output: str | os.PathLike,
    *,
    method: str = "svd",
    labels: Sequence[str] | None = None,
) -> tuple[Subspace, Path]:
    """Fit a ``dim``-dimensional subspace to the delta files ``deltas`` and write it to
    ``output`` (checked first); returns the subspace and the path written (see
    :func:`sparsetune.subspace.fit`).
    """
    check_writable(output)
    space = fit([load_delta(p) for p in deltas], dim, method=method, labels=labels)
    return space, space.save(output)


@dataclass
class SubspaceTrainReport:
    """What :func:`train_in_subspace` did: z (shape (d,)), the loss per step, the test score of
    theta(z) (``metric``: accuracy or f1), the decoded delta and where it was written (or None).
    """

    z: Tensor
    losses: list[float]
    metric: str
    score: float
    delta: SparseDelta
    path: Path | None = field(default=None)

    def summary(self) -> str:
        """The lines ``sparsetune subspace train`` prints."""
        coords = " ".join(f"{float(c):+.4g}" for c in self.z)
        lines = [
            f"z = [{coords}]; training loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}",
            f"test {self.metric}: {self.score:.4f}",
        ]
        if self.path is not None:
            lines.append(f"wrote {self.path}")
        return "\n".join(lines)


def train_in_subspace(
    subspace: str | os.PathLike,
    *,
    task: str = "rotten_tomatoes",
    model_seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 16,
    max_length: int = 64,
    mask: str | os.PathLike | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    output: str | os.PathLike | None = None,
    progress: bool = True,
) -> SubspaceTrainReport:
    """Train only z of the subspace file ``subspace`` on ``task`` (Adam, ``steps`` shuffled
    training batches, dropout on) and score theta(z) on the test split.

    ``mask``: a mask or delta file whose support the point is decoded on (default: every
    coordinate). With ``output`` (checked first) theta(z) is written as a delta file of the base.
    """
    check_writable(output)
    space, support, loaded, model, tokenizer = _setup(subspace, task, model_seed, max_examples,
                                                      mask)
    model.train()
    result = space.train(
        model, transformers_loss,
        data.batches(loaded.train, tokenizer, batch_size=batch_size, max_length=max_length,
                     shuffle=True),
        steps=steps, lr=lr, mask=support, progress=progress,
    )
    model.eval()
    tuned = space.decode(result.z, model, support, method="subspace")
    test = data.batches(loaded.test, tokenizer, batch_size=batch_size, max_length=max_length)
    score = data.evaluate(tuned.apply_to(model), test, loaded.metric)
    path = None if output is None else tuned.save(output)
    return SubspaceTrainReport(result.z, result.losses, loaded.metric, score, tuned, path)


def subspace_landscape(
    subspace: str | os.PathLike,
    output: str | os.PathLike,
    *,
    task: str = "rotten_tomatoes",
    model_seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 16,
    max_length: int = 64,
    mask: str | os.PathLike | None = None,
    grid: int = 11,
    axes: tuple[int, int] = (0, 1),
    examples: int = 128,
    progress: bool = True,
) -> Landscape:
    """The validation loss (first ``examples`` examples of ``task``) on a ``grid`` x ``grid``
    plane of the subspace file ``subspace`` along ``axes``, drawn as a PNG at ``output`` (checked
    first)."""
    check_writable(output)
    space, support, loaded, model, tokenizer = _setup(subspace, task, model_seed, max_examples,
                                                      mask)
    sample = data.Split(loaded.validation.texts[:examples], loaded.validation.labels[:examples])
    return space.landscape(
        model, transformers_loss,
        data.batches(sample, tokenizer, batch_size=batch_size, max_length=max_length),
        grid=grid, axes=tuple(axes), mask=support, path=output,
        title=f"{task}: validation loss", progress=progress,
    )


def _setup(
    subspace: str | os.PathLike, task: str, model_seed: int, max_examples: int | None,
    mask: str | os.PathLike | None,
) -> tuple[Subspace, Mask | SparseDelta | None, data.TaskData, nn.Module, object]:
    """The subspace, the support to decode on, the task, the base model and its tokenizer."""
    space = Subspace.load(subspace)
    support = None if mask is None else _mask_or_delta(mask)
    loaded = data.load_task(task, max_examples=max_examples)
    model, tokenizer = data.load_model(loaded.num_labels, seed=model_seed,
                                       attn_implementation="sdpa")
    return space, support, loaded, model, tokenizer


def _mask_or_delta(path: str | os.PathLike) -> Mask | SparseDelta:
    """A delta file as a SparseDelta (its support is used), anything else read as a mask file."""
    return load_delta(path) if read_kind(path) == "delta" else load_mask(path)
