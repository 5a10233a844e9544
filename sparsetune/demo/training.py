"""The real demo's training loop, shared with the quality and subspace benchmarks.

:func:`fine_tune` trains a model in place for a number of steps with SparseAdamW on a mask (or
dense AdamW), the lr following :func:`warmup_then_decay`, on the same dropout draws for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._loss import cycle
from ..data import Split
from ..mask import Mask
from ..optim import SparseAdamW, optimizer_state_nbytes

__all__ = ["WARMUP_FRACTION", "fine_tune", "first", "warmup_then_decay"]

WARMUP_FRACTION = 0.1  # fraction of the steps with a linear warmup, then a linear decay to 0


def first(split: Split, n: int) -> Split:
    """The first ``n`` examples of a split (its order is already seeded and random)."""
    return Split(split.texts[:n], split.labels[:n])


def warmup_then_decay(steps: int) -> Callable[[int], float]:
    """The lr factor after ``step`` optimizer steps of ``steps``: a linear warmup over the first
    :data:`WARMUP_FRACTION` of them (at least one step), then a linear decay to 0."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def fine_tune(
    model: nn.Module,
    mask: Mask | None,
    batches: Iterable[dict[str, Tensor]],
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool,
) -> tuple[list[float], int]:
    """Train ``model`` in place (train mode, dropout on); ``mask=None`` is dense AdamW.

    Returns the loss of every step and the optimizer state bytes.
    """
    if mask is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    else:
        opt = SparseAdamW(model, mask, lr=lr, weight_decay=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(steps))
    losses: list[float] = []
    stream = cycle(batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout draws for every method
        model.train()
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = model(**next(stream)).loss
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        model.eval()
    return losses, optimizer_state_nbytes(opt)
