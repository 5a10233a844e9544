"""The flat fast path of the compact optimizers: one buffer per state key for a param group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sparse_grad import selected_gradient
from .selection import Selection


class FlatGroup:
    """One param group's selected entries laid end to end: state, values and gradients.

    ``state[p][key]`` for every key in ``keys`` becomes a view into one flat buffer, so the
    optimizer's arithmetic runs once per group instead of once per parameter, and per-parameter
    views keep ``state_dict()`` unchanged. Nothing about the parameters' values is cached: the
    selected values are read from the parameters at every step (one O(k) gather per parameter),
    so any write between steps (``p.data`` edits, ``load_state_dict``, ``p.data = ...``) is
    seen. A group whose parameters change dtype, device or layout is no longer :meth:`valid`
    and is rebuilt by the optimizer.
    """

    def __init__(
        self,
        params: list[Tensor],
        selections: list[Selection],
        keys: list[str],
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:
        self.params = params
        self.selections = selections
        self.slices = []
        start = 0
        for sel in selections:
            self.slices.append(slice(start, start + sel.count))
            start += sel.count
        self.numel = start
        self.buffers = {}
        for key in keys:
            buffer = torch.cat([state[p][key].reshape(-1) for p in params])
            for p, part in zip(params, self.slices):
                state[p][key] = buffer[part]
            self.buffers[key] = buffer
        self._layout = self._layout_now()

    def _layout_now(self) -> list[tuple[torch.dtype, torch.device, bool]]:
        return [(p.dtype, p.device, p.is_contiguous()) for p in self.params]

    def valid(self) -> bool:
        """True while every parameter keeps the dtype, device and layout it was built with."""
        return self._layout_now() == self._layout

    def ready(self, state: Mapping[Tensor, dict[str, Any]]) -> bool:
        """True when the fast path applies: every gradient present, every step count equal."""
        first = state[self.params[0]].get("step")
        return all(p.grad is not None and state[p].get("step") == first for p in self.params)

    def _empty(self, dtype: torch.dtype | None = None) -> Tensor:
        like = self.params[0]
        return torch.empty(self.numel, dtype=dtype or like.dtype, device=like.device)

    def gather_gradients(self, dtype: torch.dtype | None = None) -> Tensor:
        """The selected gradient entries in ``dtype`` (None: the parameters'), a new buffer.

        float32 for 16-bit parameters in sparse-gradient mode gives the values accumulated in
        float32 (see :func:`sparsetune.sparse_grad.selected_gradient`)."""
        grad = self._empty(dtype)
        for p, sel, part in zip(self.params, self.selections, self.slices):
            selected_gradient(p, sel.index, out=grad[part])
        return grad

    def gather_values(self) -> Tensor:
        """The parameters' current selected values, in their dtype (a new buffer)."""
        values = self._empty()
        for p, sel, part in zip(self.params, self.selections, self.slices):
            if sel.index is None:
                values[part].copy_(p.view(-1))
            else:
                torch.index_select(p.view(-1), 0, sel.index, out=values[part])
        return values

    def scatter_values(self, values: Tensor) -> None:
        """Write ``values`` (in the parameters' dtype) into the selected entries."""
        for p, sel, part in zip(self.params, self.selections, self.slices):
            sel.scatter_(p, values[part])
