"""Tokenized batches of a task split, and the accuracy / F1 of a model over them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_int
from ..errors import InvalidArgumentError
from .corpora import METRICS, Split

__all__ = ["Batches", "batches", "evaluate"]


class Batches:
    """Re-iterable tokenized batches of a :class:`Split`, ready for ``model(**batch).loss``.

    Each batch is a plain dict of int64 tensors: ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (padded to the longest text in the batch, truncated to ``max_length``
    tokens) and ``labels``, on ``device``. With ``shuffle=True`` the k-th pass over the batches
    (k = 0, 1, ...) uses the order drawn from ``seed`` and k: every epoch is reshuffled, and the
    sequence of epochs is the same in every run.
    """

    def __init__(
        self,
        split: Split,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("batch_size", batch_size)
        check_int("max_length", max_length)
        check_int("seed", seed, minimum=0)
        self.split, self.tokenizer = split, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.shuffle, self.seed, self.device = shuffle, seed, device
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.split)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n).tolist()
        else:
            order = list(range(n))
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            encoded = self.tokenizer(
                [self.split.texts[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch = dict(encoded)
            batch["labels"] = torch.tensor([self.split.labels[i] for i in chunk], dtype=torch.int64)
            if self.device is not None:
                batch = {k: v.to(self.device) for k, v in batch.items()}
            yield batch


def batches(
    split: Split,
    tokenizer: Any,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Batches:
    """Tokenized batches of ``split`` (see :class:`Batches`); iterate them as often as needed."""
    return Batches(
        split,
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        shuffle=shuffle,
        seed=seed,
        device=device,
    )


def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], metric: str) -> float:
    """Accuracy, or F1 of class 1 (``metric="f1"``), of ``model``'s argmax over all ``batches``.

    Each batch is a dict with ``labels``; the rest is passed as ``model(**inputs)``, which must
    return logits of shape (batch, num_labels) or an object with ``.logits``. Runs under
    ``torch.no_grad`` in eval mode on the model's device; every module's train/eval mode is
    restored afterwards. F1 = 2 TP / (2 TP + FP + FN), and 0.0 when there is no positive at all.
    """
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric must be one of {METRICS}, got metric={metric!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    preds, golds = [], []
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out = model(**inputs)
                logits = getattr(out, "logits", out)
                preds.append(logits.argmax(dim=-1).cpu())
                golds.append(batch["labels"].cpu())
    finally:
        for m, training in modes:
            m.training = training
    if not preds:
        raise InvalidArgumentError("batches is empty: nothing to evaluate")
    pred, gold = torch.cat(preds), torch.cat(golds)
    if metric == "accuracy":
        return (pred == gold).double().mean().item()
    tp = int(((pred == 1) & (gold == 1)).sum())
    fp = int(((pred == 1) & (gold != 1)).sum())
    fn = int(((pred != 1) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
