"""The fine-tuning burn-in of ``lt_sft`` and ``magnitude`` (``burn_in_steps``) on FSDP2 shards.

:func:`sharded_burned_in` is :func:`sparsetune.select.methods.burn_in.burned_in` for a model
whose parameters are ``fully_shard``'s ``Shard(0)`` DTensors: inside the ``with`` the model has
taken ``steps`` AdamW steps (``weight_decay=0``, torch's other defaults, the burn-in's) on the
global batches, and on exit every parameter, buffer, ``.grad``, ``requires_grad`` flag and
module mode is put back bit for bit (:func:`sparsetune._loss.restoring`: one clone of each
rank's own shards, theta0, which the ``with`` yields as local tensors). No full parameter is
gathered and no optimizer outlives the ``with``.

Each step, every rank feeds its part of the global batch, and one backward leaves on each rank
its shard of the gradient of the mean of the ranks' losses (FSDP2's reduce-scatter sums the
ranks' gradients and divides by the world size): with a mean loss and equal parts, the
gradient of the mean loss over the whole global batch, as one process computes it (up to the
order of the floating-point sums). AdamW updates each entry from its own gradient and state
alone, so an AdamW per parameter over its local shard (a plain tensor sharing the shard's
storage, so that torch picks the implementation it picks for one process's tensors) gives
the one-process update of those entries. Like one process, the data is read again from the
start when it runs out (one-shot iterators cannot be); every rank must reach the end of its
data at the same step. Dropout draws come from a generator seeded by ``seed`` on every rank,
but each rank draws them for its own rows: a model with dropout trains on other draws than one
process does (the mask is then not the one-process mask, only one like it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._loss import LossFn, restoring
from ..errors import InvalidArgumentError
from ..optim.sharded import local
from ._ranks import raise_on_every_rank

__all__ = ["sharded_burned_in"]


def _passes(data: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(batch, first of a pass)`` over ``data`` again and again; ``(None, True)`` once a pass
    yields no batch (then the end)."""
    while True:
        first = True
        for batch in data:
            yield batch, first
            first = False
        if first:
            yield None, True
            return


def _lockstep(data: Iterable[Any], steps: int, device: torch.device,
              group: Any) -> Iterator[Any]:
    """``steps`` batches of ``data``, checking that every rank has one and that every rank
    starts a new pass over its data at the same step (else the same error everywhere)."""
    world = dist.get_world_size(group)
    read = _passes(data)
    for step in range(steps):
        batch, first = next(read)
        flags = torch.tensor([batch is None, first], dtype=torch.int64, device=device)
        dist.all_reduce(flags, group=group)
        missing, firsts = int(flags[0]), int(flags[1])
        error = None
        if missing == world:
            error = InvalidArgumentError("data yielded no batch for the fine-tuning burn-in" + (
                " after its first pass: a one-shot iterator cannot be read again; pass a list "
                "or a DataLoader, or fewer steps" if step else ""))
        elif missing or firsts not in (0, world):
            error = InvalidArgumentError(
                f"the ranks reached the end of their data at different burn-in steps (step "
                f"{step}: {missing} ranks had no batch, {firsts} started a new pass): under "
                f"FSDP2 every rank must feed the same number of batches"
            )
        if error is not None:  # every rank found it from the same sums: no rank waits
            raise_on_every_rank(error, group)
        yield batch


def _adamw_steps(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
                 data: Iterable[Any], steps: int, lr: float, device: torch.device,
                 group: Any) -> None:
    shards = {n: local(p.detach()) for n, p in params.items()}  # leaves sharing the storage
    opts = {n: torch.optim.AdamW([s], lr=lr, weight_decay=0.0) for n, s in shards.items()}
    try:
        for batch in _lockstep(data, steps, device, group):
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:  # a parameter the loss does not reach takes no step
                    shards[n].grad = local(p.grad)
                    opts[n].step()
                    shards[n].grad = None
                p.grad = None
    finally:
        for opt in opts.values():
            opt.state.clear()
        for n, p in params.items():
            shards[n].grad = None
            p.grad = None


@contextlib.contextmanager
def sharded_burned_in(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
                      data: Iterable[Any], *, steps: int, lr: float, seed: int,
                      device: torch.device, group: Any) -> Iterator[dict[str, Tensor]]:
    """Inside the ``with``: ``model`` after ``steps`` AdamW steps of its trainable ``params``
    (name -> sharded parameter) on the global batches; restored on exit (module docstring).

    Yields ``name -> theta0``, this rank's shard of each parameter before the burn-in (the
    clone that restores it: read it, do not modify it). Collective over ``group``.
    """
    with restoring(model) as saved, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        _adamw_steps(model, params, loss_fn, data, steps, lr, device, group)
        yield {n: local(saved(p)) for n, p in params.items()}
