"""The float32 accumulator of a 16-bit weight's compact gradient.

Autograd adds the gradients of successive backward passes (gradient accumulation over
micro-batches) in the parameter's dtype: in bfloat16 a contribution smaller than half an ulp
of the running sum is lost. For a bfloat16 or float16 weight in sparse-gradient mode the k
selected values are therefore also summed in float32 here, and ``weight.grad`` holds that sum
rounded to the weight's dtype (so ``zero_grad``, GradScaler and every reader of ``.grad`` keep
working). :func:`~sparsetune.sparse_grad.selected_gradient` hands out the float32 sum while
``weight.grad`` still holds exactly its rounding; once anything else has changed ``.grad``
(``zero_grad(set_to_none=False)``, GradScaler's ``unscale_``, clipping), ``.grad`` is the truth
again and the next backward pass continues from it. Cost: 4 bytes per selected entry.

Two hooks on the weight drive it: before autograd adds a pass's gradient to ``.grad``, the
float32 sum of that pass's contributions (from every module using the weight) is added to the
float32 value of the current ``.grad``; after, ``.grad`` is replaced by the rounding of the new
sum. A pass's contributions are tagged with autograd's graph task, so a pass that never reaches
``.grad`` (``torch.autograd.grad``) leaves nothing behind.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["Fp32Accumulator"]


def _task() -> int:
    return torch._C._current_graph_task_id()


class Fp32Accumulator:
    """The float32 sum of one 16-bit weight's compact gradients (see the module docstring).

    ``indices``: the (2, k) indices of the weight's sparse gradients (a plan's, shared);
    ``shape``: the weight's shape.
    """

    def __init__(self, indices: Tensor, shape: tuple[int, ...]) -> None:
        self.indices, self.shape, self.count = indices, shape, indices.shape[1]
        self.total: Tensor | None = None  # float32 values whose rounding ``.grad`` holds
        self._pending: tuple[int, Tensor] | None = None  # (graph task, this pass's sum)
        self._staged: tuple[int, Tensor] | None = None  # (graph task, the new total)

    def add(self, values: Tensor) -> None:
        """One contribution of the running backward pass (float32 values, from a backward)."""
        task = _task()
        if self._pending is not None and self._pending[0] == task:
            self._pending[1].add_(values)
        else:
            self._pending = (task, values.to(torch.float32, copy=True))

    def attach(self, param: Tensor) -> list[Any]:
        """Register the two hooks on ``param``; returns their handles."""
        ref = weakref.ref(param)

        def before(grad: Tensor) -> None:
            p = ref()
            if p is not None:
                self._before_accumulation(p, grad)

        return [param.register_hook(before),
                param.register_post_accumulate_grad_hook(self._after_accumulation)]

    def detach(self) -> None:
        self.total = self._pending = self._staged = None

    def _before_accumulation(self, param: Tensor, grad: Tensor) -> None:
        pending, self._pending, self._staged = self._pending, None, None
        if pending is None or pending[0] != _task() or not grad.is_sparse:
            return  # nothing of ours, or mixed with a dense gradient: autograd's sum stands
        if param.grad is None:
            self._staged = (pending[0], pending[1])
            return
        base = self.read(param.grad)
        if base is not None:
            self._staged = (pending[0], base + pending[1])

    def _after_accumulation(self, param: Tensor) -> None:
        staged, self._staged = self._staged, None
        grad = param.grad
        if staged is None or staged[0] != _task() or grad is None or not grad.is_sparse:
            return
        self.total = staged[1]
        param.grad = torch.sparse_coo_tensor(
            self.indices, self.total.to(param.dtype), self.shape, is_coalesced=True,
            check_invariants=False,
        )

    def precise(self, grad: Tensor) -> Tensor | None:
        """The float32 values of a sparse ``grad`` holding exactly the rounding of this
        accumulator's sum (also the sum being installed by the running pass), else None."""
        candidates = [self.total]
        if self._staged is not None and self._staged[0] == _task():
            candidates.append(self._staged[1])  # read by a hook that runs before ours
        indices = grad._indices()
        if grad._nnz() != self.count or not (
            indices.data_ptr() == self.indices.data_ptr() or torch.equal(indices, self.indices)
        ):
            return None
        values = grad._values()
        for total in candidates:
            if total is not None and torch.equal(values, total.to(values.dtype)):
                return total
        return None

    def read(self, grad: Tensor) -> Tensor | None:
        """The float32 values of the current sparse ``grad`` at the selected entries (a new
        tensor), or None where it holds other entries than the weight's selected ones."""
        if not grad.is_sparse:
            return None
        precise = self.precise(grad)
        if precise is not None:
            return precise.clone()
        grad = grad.coalesce()
        if grad._nnz() == 0:
            return torch.zeros(self.count, dtype=torch.float32, device=grad.device)
        if grad._nnz() == self.count and torch.equal(grad._indices(), self.indices):
            return grad._values().float()
        return None
