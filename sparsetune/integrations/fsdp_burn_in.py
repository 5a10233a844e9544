"""The training runs of selection on FSDP2 shards: the fine-tuning burn-in of ``lt_sft`` and
``magnitude`` (``burn_in_steps``), and ``sam``'s head warm-up (``head_warmup_steps``).

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

``offload`` (None, ``"cpu"``, ``"disk"``, as for one process) keeps theta0 of the local shards
and each shard's two AdamW moments in the burn-in's store
(:class:`~sparsetune.select.methods.burn_in.Store`): beside the shards, in host memory, or in
one unlinked temporary file per rank, each shard's moments read just before its step and
written back just after. The trained shards, and so the mask, are the same bit for bit.

:func:`sharded_head_warmed_up` is :func:`~sparsetune.select.methods.burn_in.after_head_warmup`:
``steps`` AdamW steps on the ``always_train`` head alone, with a plain backward while only the
head requires grad (the body's flags are off meanwhile, then put back), so FSDP2
reduce-scatters the head's gradients and computes none for the body; one AdamW over the head's
local shards, as one process has one over the head. The scores are then read with the
warmed-up head, and the head's shards are put back bit for bit on exit.
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
from ..select.methods.burn_in import StepInBackward, Store, theta0_in_store
from ._ranks import raise_on_every_rank

__all__ = ["sharded_burned_in", "sharded_head_warmed_up"]


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


def _lockstep(data: Iterable[Any], steps: int, device: torch.device, group: Any,
              what: str = "the fine-tuning burn-in") -> Iterator[Any]:
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
            error = InvalidArgumentError(f"data yielded no batch for {what}" + (
                " after its first pass: a one-shot iterator cannot be read again; pass a list "
                "or a DataLoader, or fewer steps" if step else ""))
        elif missing or firsts not in (0, world):
            error = InvalidArgumentError(
                f"the ranks reached the end of their data at different steps of {what} "
                f"(step {step}: {missing} ranks had no batch, {firsts} started a new pass): under "
                f"FSDP2 every rank must feed the same number of batches"
            )
        if error is not None:  # every rank found it from the same sums: no rank waits
            raise_on_every_rank(error, group)
        yield batch


def _adamw_steps(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
                 data: Iterable[Any], steps: int, lr: float, device: torch.device,
                 group: Any, store: Store) -> None:
    names = list(params)
    shards = [local(params[n].detach()) for n in names]  # leaves sharing the storage
    # one AdamW per local shard, stepped after backward; with an offloading store each
    # shard's moments are fetched just before its step and put back just after
    adamw = StepInBackward(shards, lr, store, hooks=False)
    try:
        for batch in _lockstep(data, steps, device, group):
            loss_fn(model, batch).backward()
            for i, n in enumerate(names):
                p = params[n]
                if p.grad is not None:  # a parameter the loss does not reach takes no step
                    shards[i].grad = local(p.grad)
                adamw.step(i)  # drops shards[i].grad
                p.grad = None
    finally:
        adamw.close()
        for shard, p in zip(shards, params.values()):
            shard.grad = None
            p.grad = None


@contextlib.contextmanager
def sharded_burned_in(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
                      data: Iterable[Any], *, steps: int, lr: float, seed: int,
                      device: torch.device, group: Any,
                      offload: str | None = None) -> Iterator[Mapping[str, Tensor]]:
    """Inside the ``with``: ``model`` after ``steps`` AdamW steps of its trainable ``params``
    (name -> sharded parameter) on the global batches; restored on exit (module docstring).

    Yields ``name -> theta0``, this rank's shard of each parameter before the burn-in (read
    it, do not modify it): the clone that restores it, or with ``offload`` a new tensor read
    from the store on each access. ``offload`` (None, ``"cpu"``, ``"disk"``): where theta0 of
    the local shards and AdamW's moments are kept, as in
    :func:`~sparsetune.select.methods.burn_in.burned_in` (same values bit for bit).
    Collective over ``group``.
    """
    store = Store(offload)  # checks offload
    try:
        if offload is None:
            with restoring(model) as saved, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.train()
                _adamw_steps(model, params, loss_fn, data, steps, lr, device, group, store)
                yield {n: local(saved(p)) for n, p in params.items()}
            return
        # theta0 of the local shards goes to the store and is written back from it
        shards = [(n, local(p.detach())) for n, p in params.items()]
        with theta0_in_store(model, shards, store, seed) as theta0:
            _adamw_steps(model, params, loss_fn, data, steps, lr, device, group, store)
            yield theta0
    finally:
        store.close()


@contextlib.contextmanager
def sharded_head_warmed_up(model: nn.Module, params: Mapping[str, Tensor], head: Iterable[str],
                           loss_fn: LossFn, data: Iterable[Any], *, steps: int, lr: float,
                           seed: int, device: torch.device, group: Any) -> Iterator[None]:
    """Inside the ``with``: ``model`` with its ``head`` parameters (names of ``params``, the
    ``always_train`` task head) after ``steps`` AdamW steps on the global batches, the rest of
    the model frozen; everything else as found. On exit the head's shards are put back bit for
    bit (:func:`~sparsetune.select.methods.burn_in.after_head_warmup` for a sharded model).

    The warm-up runs a plain backward (FSDP2's reduce-scatter of the head's gradients) with
    only the head requiring grad, and one AdamW over the head's local shards (one process's
    AdamW over the head); then the ``requires_grad`` flags, modes, buffers, gradients and RNG
    state are put back, so that the scores read inside the ``with`` are those of the model with
    the warmed-up head. Collective over ``group``.
    """
    wanted = set(head)
    head = {n: p for n, p in params.items() if n in wanted}  # in the model's order
    shards = {n: local(p.detach()) for n, p in head.items()}  # leaves sharing the storage
    initial = {n: s.clone() for n, s in shards.items()}
    trained = {id(p) for p in head.values()}
    try:
        with restoring(model, parameters=False), torch.random.fork_rng(devices=[]):
            for p in model.parameters():  # the body frozen: no gradient computed for it
                p.requires_grad_(id(p) in trained)
            torch.manual_seed(seed)
            model.train()
            opt = torch.optim.AdamW(list(shards.values()), lr=lr, weight_decay=0.0)
            try:
                for batch in _lockstep(data, steps, device, group, "the head warm-up"):
                    loss_fn(model, batch).backward()
                    for n, p in head.items():
                        shards[n].grad = None if p.grad is None else local(p.grad)
                        p.grad = None
                    opt.step()
                    for s in shards.values():
                        s.grad = None
            finally:
                opt.state.clear()
                for n, p in head.items():
                    shards[n].grad = None
                    p.grad = None
        yield
    finally:
        with torch.no_grad():
            for n, s in shards.items():
                s.copy_(initial[n])
