"""Training steps that selection runs: a fine-tuning burn-in, and the head warm-up before SAM.

Both train on a snapshot: the model's weights, buffers (BatchNorm statistics), gradients,
``requires_grad`` flags, modes and the caller's RNG state are restored afterwards.

Memory of a full burn-in (:func:`burned_in`), besides the model: theta0, the copy that restores
it (1x the trained parameters' bytes), and AdamW's two moments in the parameters' dtype (2x),
freed before the burned-in model is read; no gradient of the whole model is held at once, since
each parameter takes its AdamW step inside backward as soon as its gradient is complete, and the
gradient is then dropped. So about 3x the model's bytes plus what one forward and backward hold:
the floor of exact AdamW fine-tuning that keeps its state in memory and leaves the model as it
found it. ``offload="cpu"`` moves theta0 and the moments to host memory (a model on a GPU then
adds only a forward and backward's worth of device memory); ``offload="disk"`` to a temporary
file, read and written one parameter at a time (then about 1x the largest parameter plus a
forward and backward's worth; benchmarks/selection_scale.py measures it). Same values either way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_int
from ..._loss import LossFn, batches, restoring
from ...errors import InvalidArgumentError
from .._data import trainable

__all__ = ["OFFLOADS", "StepInBackward", "Store", "StoredValues", "after_head_warmup",
           "burned_in", "check_offload", "finetuned_values", "theta0_in_store"]

#: Where a burn-in may keep theta0 and AdamW's moments (see :func:`burned_in`).
OFFLOADS = (None, "cpu", "disk")


def check_offload(offload: object) -> None:
    """Raise unless ``offload`` is one of :data:`OFFLOADS`."""
    if offload not in OFFLOADS:
        raise InvalidArgumentError(
            f"offload must be one of None, 'cpu', 'disk' (where the burn-in keeps theta0 and "
            f"AdamW's moments), got {offload!r}"
        )


def _trained(model: nn.Module, only: Collection[str] | None) -> list[tuple[str, nn.Parameter]]:
    named = trainable(model)
    if only is None:
        return named
    missing = sorted(set(only) - {n for n, _ in named})
    if missing or not only:
        raise InvalidArgumentError(
            f"only= must name trainable parameters of the model; unknown: {missing}"
            if missing else "only= names no parameter: nothing to train"
        )
    wanted = set(only)
    return [(n, p) for n, p in named if n in wanted]


class Store:
    """Where the burn-in keeps theta0 and AdamW's moments between uses (``offload``).

    ``None``: on the parameters' device, as they are (no copy made here). ``"cpu"``: in host
    memory (for a model on an accelerator: no device memory). ``"disk"``: in one temporary file
    (unlinked at creation, so nothing is left behind even on a crash), written and read back
    tensor by tensor: neither host nor device memory holds them. :meth:`get` gives a tensor on
    ``device`` (a new one, except with ``None``), :meth:`put` stores a tensor (a copy, except
    with ``None``).
    """

    def __init__(self, offload: str | None) -> None:
        check_offload(offload)
        self.offload = offload
        self._held: dict[Hashable, Tensor] = {}
        self._where: dict[Hashable, tuple[int, torch.Size, torch.dtype]] = {}
        self._file = None
        if offload == "disk":  # closed by close(), which every user calls in a finally
            self._file = tempfile.TemporaryFile(prefix="sparsetune-burn-in-")  # noqa: SIM115
        self._end = 0

    def put(self, key: Hashable, tensor: Tensor) -> None:
        tensor = tensor.detach()
        if self._file is None:
            self._held[key] = tensor if self.offload is None else tensor.to("cpu", copy=True)
            return
        flat = tensor.reshape(-1).contiguous().cpu().view(torch.uint8)
        where = self._where.get(key)
        if where is None or where[1] != tensor.shape or where[2] != tensor.dtype:
            where = (self._end, tensor.shape, tensor.dtype)
            self._end += flat.numel()
            self._where[key] = where
        view, offset = memoryview(flat.numpy()), where[0]
        while len(view):
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def get(self, key: Hashable, device: torch.device) -> Tensor:
        if self._file is None:
            return self._held[key].to(device)
        offset, shape, dtype = self._where[key]
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        while len(view):
            read = os.preadv(self._file.fileno(), [view], offset)
            if read <= 0:
                raise OSError(f"the burn-in's offload file ended early at byte {offset}")
            view, offset = view[read:], offset + read
        return out.to(device)

    def close(self) -> None:
        self._held.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


class StepInBackward:
    """One AdamW per parameter, stepped by a post-accumulate-grad hook the moment backward has
    completed that parameter's gradient, which is then dropped (torch's "optimizer step in
    backward"). AdamW updates each parameter from its own gradient and state alone, so this is
    the update of one AdamW over all of them, bit for bit. A gradient completed twice in one
    backward (a weight shared by reentrant checkpointed segments) would be stepped on part of
    its sum: that raises rather than train on it.

    With a ``store`` that offloads, each parameter's two moments are fetched from it just
    before its step and put back just after, so only one parameter's moments are held at a
    time. ``hooks=False``: no hooks, :meth:`step` is called for every parameter after backward.
    """

    def __init__(self, params: list[Tensor], lr: float, store: Store | None = None,
                 hooks: bool = True) -> None:
        self.params = params
        self.opts = [torch.optim.AdamW([p], lr=lr, weight_decay=0.0) for p in params]
        self.store = store if store is not None and store.offload is not None else None
        self.stepped: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                        for i, p in enumerate(params)] if hooks else []

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def step(param: Tensor) -> None:
            if i in self.stepped:
                raise InvalidArgumentError(
                    "the fine-tuning burn-in steps each parameter inside backward, but one "
                    "parameter's gradient was completed twice in one backward (a weight shared "
                    "by reentrant gradient-checkpointed segments?): disable gradient "
                    "checkpointing for selection, or use non-reentrant checkpointing"
                )
            self.stepped.add(i)
            self.step(i)
        return step

    def step(self, i: int) -> None:
        """AdamW's step of parameter ``i`` from its ``.grad``, which is then dropped."""
        param, opt = self.params[i], self.opts[i]
        state = opt.state[param]
        if self.store is not None and state:  # AdamW creates the moments at the first step
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = self.store.get((key, i), param.device)
        if param.grad is not None:
            opt.step()
        if self.store is not None and state:
            for key in ("exp_avg", "exp_avg_sq"):
                self.store.put((key, i), state.pop(key))
        param.grad = None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for opt in self.opts:
            opt.state.clear()
        self.opts = []


class StoredValues(Mapping[str, Tensor]):
    """``name -> theta0`` read from a :class:`Store` on each access (a new tensor each time)."""

    def __init__(self, store: Store, named: list[tuple[str, Tensor]]) -> None:
        self._store, self._devices = store, {n: p.device for n, p in named}

    def __getitem__(self, name: str) -> Tensor:
        return self._store.get(("theta0", name), self._devices[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._devices)

    def __len__(self) -> int:
        return len(self._devices)


def _in_backward(model: nn.Module, params: list[Tensor], only: Collection[str] | None) -> bool:
    """Whether the steps can run inside backward with the same result: every parameter trained
    (not a probe), on one device type (one AdamW over all would pick one implementation), and
    no module flagged for gradient checkpointing (transformers' flag: recomputed forwards)."""
    kinds = {p.device.type for p in params}
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return only is None and len(kinds) == 1 and not checkpointing


def _adamw_steps(model, loss_fn, data, params, steps, lr, progress, only, store) -> None:
    in_backward = _in_backward(model, params, only)
    per_param = in_backward or store.offload is not None
    fused = StepInBackward(params, lr, store, hooks=in_backward) if per_param else None
    opt = None if per_param else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = 0
    try:
        while done < steps:
            before = done
            for batch in batches(data, "fine-tuning burn-in", progress, limit=steps - done):
                if in_backward:
                    fused.stepped.clear()
                    loss_fn(model, batch).backward()  # each parameter steps as its grad lands
                    done += 1
                    continue
                for p in params:
                    p.grad = None
                if only is None:
                    loss_fn(model, batch).backward()
                else:  # gradients of the trained parameters only (no pass through the rest)
                    grads = torch.autograd.grad(loss_fn(model, batch), params)
                    for p, g in zip(params, grads):
                        p.grad = g
                if fused is not None:  # offloaded moments: one parameter at a time
                    for i in range(len(params)):
                        fused.step(i)
                else:
                    opt.step()
                done += 1
            if done == before:
                raise InvalidArgumentError("data yielded no batch for the fine-tuning burn-in")
    finally:  # the optimizer state and the gradients go before the trained values are read
        if fused is not None:
            fused.close()
        else:
            opt.state.clear()
        for p in params:
            p.grad = None


@contextlib.contextmanager
def burned_in(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    only: Collection[str] | None = None,
    offload: str | None = None,
) -> Iterator[Mapping[str, Tensor]]:
    """Inside the ``with``: ``model`` after ``steps`` of AdamW fine-tuning; restored on exit.

    Yields ``name -> theta0``, the trained parameters' values before the burn-in (the copy that
    restores the model: read it, do not modify it), so that a score such as |theta - theta0|
    is read tensor by tensor from the model without a copy of the trained values. Every
    trainable parameter is trained, or only those named in ``only`` (then with gradients of
    those alone, in one AdamW step after backward). Cycles over ``data`` if it runs out (when it
    can be iterated again). Dropout draws come from a private generator seeded by ``seed``;
    the caller's RNG state is untouched. Memory: see the module's docstring.

    ``offload``: where theta0 and the two AdamW moments are kept: ``None`` (beside the
    parameters), ``"cpu"`` (host memory: for a model on a GPU, the burn-in then adds only
    what one forward and backward hold to its device memory) or ``"disk"`` (one temporary
    file, unlinked from the start: theta0 written once and read back tensor by tensor, each
    parameter's moments read and written around its step). The trained values, and so the
    scores and the mask, are the same bit for bit; only where the bytes live (and the time
    the copies take) differs.
    """
    check_int("steps", steps)
    if not lr > 0:
        raise InvalidArgumentError(f"lr must be > 0, got lr={lr!r}")
    named = _trained(model, only)
    params = [p for _, p in named]
    store = Store(offload)
    if offload is None:
        try:
            with restoring(model) as saved, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.train()
                _adamw_steps(model, loss_fn, data, params, steps, lr, progress, only, store)
                yield {n: saved(p) for n, p in named}
        finally:
            store.close()
        return
    # theta0 of the trained parameters goes to the store (the others are not written here)
    try:
        with theta0_in_store(model, named, store, seed) as theta0:
            _adamw_steps(model, loss_fn, data, params, steps, lr, progress, only, store)
            yield theta0
    finally:
        store.close()


@contextlib.contextmanager
def theta0_in_store(model: nn.Module, named: list[tuple[str, Tensor]], store: Store,
                    seed: int) -> Iterator[StoredValues]:
    """An offloaded burn-in's frame: theta0 of the ``named`` tensors (parameters, or a rank's
    shards of them) put in ``store``, the model in train mode with a private RNG seeded by
    ``seed``; on exit the tensors written back from the store bit for bit, and modes, flags,
    buffers and gradients put back by :func:`restoring`. Yields theta0 as
    :class:`StoredValues`."""
    with restoring(model, parameters=False), torch.random.fork_rng(devices=[]):
        for n, t in named:
            store.put(("theta0", n), t)
        try:
            torch.manual_seed(seed)
            model.train()
            yield StoredValues(store, named)
        finally:
            with torch.no_grad():
                for n, t in named:
                    t.copy_(store.get(("theta0", n), t.device))


def finetuned_values(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    only: Collection[str] | None = None,
    offload: str | None = None,
) -> dict[str, Tensor]:
    """Parameter values after ``steps`` of AdamW fine-tuning (a copy); the model is restored.

    Every trainable parameter is trained, or only those named in ``only`` (e.g. the task head:
    a linear probe; the others then stay fixed and only ``only``'s values are returned); see
    :func:`burned_in`, which reads them without the copy, and for ``offload``.
    """
    with burned_in(model, loss_fn, data, steps=steps, lr=lr, seed=seed, progress=progress,
                   only=only, offload=offload) as initial:
        return {n: p.detach().clone() for n, p in trainable(model) if n in initial}


def after_head_warmup(
    model: nn.Module,
    always_train: list[str],
    data: Iterable[Any],
    loss_fn: LossFn,
    seed: int,
    steps: int | None,
    lr: float,
    progress: bool,
    score: Callable[[], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """``score()`` after ``steps`` AdamW steps on the always-trained parameters (the task head)
    alone, body frozen; the model is restored afterwards. With a randomly initialised head, the
    gradient at theta0 depends on that draw (benchmarks/README.md, quality: ``sam_probe``)."""
    if steps is None or steps == 0:
        return score()
    check_int("head_warmup_steps", steps)
    if not always_train:
        raise InvalidArgumentError(
            "head_warmup_steps trains the always_train parameters (the task head) alone before "
            "scoring, but always_train is empty: name the head, e.g. always_train="
            "['classifier.weight', 'classifier.bias']"
        )
    if iter(data) is data:
        raise InvalidArgumentError(
            f"head_warmup_steps reads data twice (the head warm-up, then the scores), but data "
            f"is a one-shot iterator ({type(data).__name__}): pass a list or a DataLoader"
        )
    # finetuned_values restores the model; only the head is then swapped in and back out.
    trained = finetuned_values(model, loss_fn, data, steps=steps, lr=lr, seed=seed,
                               progress=progress, only=always_train)
    head = {n: p for n, p in model.named_parameters() if n in trained}
    initial = {n: p.detach().clone() for n, p in head.items()}
    try:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(trained[name])
        return score()
    finally:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(initial[name])
