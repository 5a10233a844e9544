"""The float32 sum of a 16-bit parameter's selected dense gradient entries (issue 21).

Autograd adds the gradients of successive backward passes (gradient accumulation over
micro-batches) into ``.grad`` in the parameter's dtype: in bfloat16 a contribution smaller
than half an ulp of the running sum is lost. For a bf16/fp16 parameter with master weights the
compact optimizers therefore also sum the k SELECTED entries of each pass's gradient in
float32 (4 bytes per selected entry), and ``.grad`` holds that sum rounded at those entries.

Two hooks on the parameter drive it (as :mod:`sparsetune.sparse_grad.accumulate` does for
sparse gradients): ``register_hook`` sees a pass's gradient before autograd adds it to
``.grad`` and stages ``sum + gradient`` in float32; the post-accumulate-grad hook then keeps
the staged sum and writes its rounding into ``.grad`` at the selected entries. A pass that
never reaches ``.grad`` (``torch.autograd.grad``) leaves nothing behind: sums are tagged with
autograd's graph task.

Reading (:meth:`DenseFp32Accumulator.read`) is per entry: where ``.grad`` holds exactly the
rounding of the float32 sum, the sum; elsewhere (``zero_grad``, ``GradScaler.unscale_``,
clipping by torch, any write), ``.grad`` itself, converted. Entries without a sum hold NaN,
which equals nothing. Within one backward pass autograd itself sums the contributions of a
parameter's several uses in its dtype; only the sum over passes is kept in float32.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .selection import Selection

__all__ = ["DenseFp32Accumulator"]


def check_fp32_grad_accumulation(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(
            f"fp32_grad_accumulation must be True, False or None, got {value!r}"
        )


def _task() -> int:
    return torch._C._current_graph_task_id()


class DenseFp32Accumulator:
    """The float32 sum of the selected entries of one 16-bit parameter's dense gradients."""

    def __init__(self, param: Tensor, selection: Selection) -> None:
        self.selection = selection
        self.total = self._unset(param)
        self._staged: tuple[int, Tensor] | None = None
        ref = weakref.ref(param)

        def before(grad: Tensor) -> None:
            p = ref()
            if p is not None:
                self._before_accumulation(p, grad)

        self.handles: list[Any] = [
            param.register_hook(before),
            param.register_post_accumulate_grad_hook(self._after_accumulation),
        ]

    def _unset(self, param: Tensor) -> Tensor:
        return torch.full((self.selection.count,), float("nan"), device=param.device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reset(self) -> None:
        """Forget the sum (``.grad`` is then read as it is)."""
        self.total.fill_(float("nan"))

    def read(self, current: Tensor) -> Tensor:
        """Float32 gradient at the selected entries, from ``current`` (``.grad`` there, in
        the parameter's dtype): the sum where ``current`` is its rounding, else ``current``."""
        total = self.total
        if total.device != current.device:
            return current.float()
        return torch.where(current == total.to(current.dtype), total, current.float())

    def _gather(self, tensor: Tensor) -> Tensor:
        return self.selection.gather(tensor)

    def _before_accumulation(self, param: Tensor, grad: Tensor) -> None:
        self._staged = None
        if grad.is_sparse or grad.dtype != param.dtype or grad.requires_grad:
            return
        if self.total.device != param.device:
            self.total = self._unset(param)
        incoming = self._gather(grad).float()
        current = param.grad
        if current is None:
            self._staged = (_task(), incoming)
        elif not current.is_sparse:
            self._staged = (_task(), self.read(self._gather(current)) + incoming)

    def _after_accumulation(self, param: Tensor) -> None:
        staged, self._staged = self._staged, None
        grad = param.grad
        if staged is None or staged[0] != _task() or grad is None or grad.is_sparse:
            return
        self.total = staged[1]
        self.selection.scatter_(grad, self.total.to(grad.dtype))

    def set_(self, param: Tensor, values: Tensor) -> None:
        """Make ``values`` (float32, the selected entries) the sum, and ``.grad`` its rounding
        there (used by clipping)."""
        self.total = values
        self.selection.scatter_(param.grad, values.to(param.grad.dtype))
