"""The flat fast path of the compact optimizers: one update per param group.

``impl="flat"`` (the default of SparseAdamW): the state of a group's selected entries (moments,
masters, ...) lives in one flat buffer per key, so the update's arithmetic runs once per group.
Where the pointer-table kernel can run for the group's device and dtype (CUDA with Triton
installed; CPU only under ``TRITON_INTERPRET=1``, for tests; :data:`TABLE` overrides), the
selected values, the dense gradients (every ``.grad`` dense, contiguous, of one dtype) and the
write-back each cost one launch for the whole group (:class:`sparsetune.kernels.GatherTable`),
so the step's launches do not grow with the number of tensors. Elsewhere (CPU, or gradients
that are sparse, non-contiguous or of mixed dtypes) they are gathered and scattered parameter
by parameter, O(number of tensors) small launches.

``impl="packed"`` (opt-in) goes further: O(1) launches per step. A param group's parameters
with selected entries (one device, one dtype, contiguous) are laid
end to end in one flat buffer (``FlatGroup.weights``: each parameter's ``.data`` becomes a view
of its slice, as FSDP's flat parameter does), and their dense gradients in another
(``FlatGroup.grads``: a hook makes each ``.grad`` a view of its slice). One index over the
concatenation (``FlatGroup.index``, the selected entries of every parameter, offset) then
reads the values and the gradients with one ``index_select`` each and writes the values back
with one ``index_put_``: the number of kernel launches of a step does not grow with the number
of tensors. The state (moments, masters, ...) lives in one flat buffer per key too.

Nothing about the parameters' values is cached: they are read at every step, so any write
between steps is seen. In-place writes (``p.data.add_``, ``load_state_dict``, ``no_grad``
copies) land in the flat buffer itself; a parameter whose ``.data`` was replaced by another
tensor of the same shape, dtype and device is packed again (its new values copied into its
slice); one whose dtype, device or layout changed makes the group invalid, and the optimizer
rebuilds it (or runs the per-parameter step for a group that cannot be packed).

Gradients: when autograd puts a fresh gradient into ``.grad`` (the first backward after
``zero_grad()``), a post-accumulate-grad hook copies it into the flat gradient buffer and makes
``.grad`` a view of it; later backward passes accumulate into the view in place. Cost: one copy
of each dense gradient per optimizer step, and the flat gradient buffer stays allocated between
steps (created at the first dense gradient: never in sparse-gradient mode). Where a gradient
is not the view (sparse gradients of :func:`sparsetune.prepare`, ``create_graph=True``), the
selected entries are gathered parameter by parameter.

Costs of "packed": the flat index, 4 bytes per selected entry (8 beyond 2**31 entries in the
group); the packing copies the group's parameters once at the first step (a transient second
copy of them), the parameters then share one storage, and the flat gradient buffer (the size
of those parameters) stays allocated between steps, which raises the memory outside backward.
That is why it is not the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..kernels import GatherTable, kernel_available
from ..sparse_grad import plan_of, selected_gradient
from .selection import Selection, write_selected

__all__ = ["TABLE", "FlatGroup"]

_INT32_LIMIT = 2**31 - 1

#: Whether non-packed groups gather and scatter through a :class:`GatherTable` (one launch
#: each): None (default) where :func:`sparsetune.kernels.kernel_available` holds for the
#: group's device and dtype, True always (its torch twin where the kernel cannot run), False
#: never (the per-parameter loops). Read when a group is built; ``FlatGroup(table=...)``
#: overrides it for one group.
TABLE: bool | None = None


class FlatGroup:
    """One param group's selected entries laid end to end: state, values and gradients.

    ``state[p][key]`` for every key in ``keys`` becomes a view into one flat buffer, so the
    optimizer's arithmetic runs once per group instead of once per parameter, and per-parameter
    views keep ``state_dict()`` unchanged. See the module docstring for the parameters and
    gradients. :meth:`close` removes the hooks (the parameters stay packed). ``table``: see
    :data:`TABLE` (None: its value); ignored when packed.
    """

    def __init__(
        self,
        params: list[Tensor],
        selections: list[Selection],
        keys: list[str],
        state: Mapping[Tensor, dict[str, Any]],
        pack: bool = False,
        table: bool | None = None,
    ) -> None:
        self.params = params
        self.pack = pack
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
        self.grads: Tensor | None = None  # allocated at the first dense gradient (packed)
        self._grad_ptrs: list[int] = []
        self._handles: list[Any] = []
        self.table: GatherTable | None = None
        if pack:
            self._pack(params, selections)
        elif self._wants_table(table):
            self.table = GatherTable(
                [p.numel() for p in params],
                [_local_index(sel, p.device) for p, sel in zip(params, selections)],
                params[0].device,
            )

    def _wants_table(self, table: bool | None) -> bool:
        """Whether the reads and writes go through a :class:`GatherTable` (see :data:`TABLE`)."""
        table = TABLE if table is None else table
        if table is not None:
            return bool(table)
        like = self.params[0]
        return kernel_available(like.device.type, like.dtype)

    def _pack(self, params: list[Tensor], selections: list[Selection]) -> None:
        """Lay the parameters end to end in :attr:`weights` and hook their gradients."""
        like = params[0]
        self.spans, parts, offset = [], [], 0
        for p, sel in zip(params, selections):
            self.spans.append(slice(offset, offset + p.numel()))
            local = (
                torch.arange(p.numel(), device=like.device)
                if sel.index is None
                else sel.index.to(torch.int64)
            )
            parts.append(local + offset)
            offset += p.numel()
        self.total = offset
        dtype = torch.int32 if offset <= _INT32_LIMIT else torch.int64
        self.index = torch.cat(parts).to(dtype)
        self.weights = torch.cat([p.detach().reshape(-1) for p in params])
        self._weight_views = [self.weights[s].view(p.shape) for p, s in zip(params, self.spans)]
        for p, view in zip(params, self._weight_views):
            p.data = view
        self._weight_ptrs = [v.data_ptr() for v in self._weight_views]
        self._handles = [
            p.register_post_accumulate_grad_hook(self._lend_gradient) for p in params
        ]
        self._slot = {id(p): i for i, p in enumerate(params)}

    # -- layout ---------------------------------------------------------------------------
    def _layout_now(self) -> list[tuple[torch.dtype, torch.device, bool]]:
        return [(p.dtype, p.device, p.is_contiguous()) for p in self.params]

    def valid(self) -> bool:
        """True while every parameter keeps the dtype, device and layout it was built with."""
        return self._layout_now() == self._layout

    def ready(self, state: Mapping[Tensor, dict[str, Any]]) -> bool:
        """True when the fast path applies: every gradient present, every step count equal."""
        first = state[self.params[0]].get("step")
        return all(p.grad is not None and state[p].get("step") == first for p in self.params)

    def dense_gradients(self) -> bool:
        """True when every parameter's gradient is dense."""
        return all(p.grad is not None and not p.grad.is_sparse for p in self.params)

    def close(self) -> None:
        """Remove the gradient hooks (the group is no longer used)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _packed(self) -> bool:
        """Pack again every parameter whose ``.data`` was replaced (same shape, dtype, device,
        contiguous, as :meth:`valid` ensures); True when all are views of :attr:`weights`."""
        if not self.pack:
            return False
        for i, (p, view) in enumerate(zip(self.params, self._weight_views)):
            if p.data_ptr() == self._weight_ptrs[i] and p.shape == view.shape:
                continue
            if p.shape != view.shape:
                return False
            view.copy_(p.detach())
            p.data = view
        return True

    def _lend_gradient(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: make a fresh dense ``p.grad`` a view of :attr:`grads`."""
        grad = p.grad
        i = self._slot.get(id(p))
        if (
            i is None
            or grad is None
            or grad.is_sparse
            or grad.requires_grad
            or grad.dtype != self.weights.dtype
            or grad.device != self.weights.device
            or grad.shape != self._weight_views[i].shape
        ):
            return
        if self.grads is None:
            self.grads = torch.zeros_like(self.weights)
            self._grad_ptrs = [self.grads[s].data_ptr() for s in self.spans]
        if grad.data_ptr() == self._grad_ptrs[i] and grad.is_contiguous():
            return
        # a new view each time: ``model.to()`` swaps the ``.data`` of the ``.grad`` object
        view = self.grads[self.spans[i]].view(grad.shape)
        view.copy_(grad)
        p.grad = view

    def _dense_gradients(self) -> list[Tensor] | None:
        """Every parameter's ``.grad`` where all are dense, contiguous, of the first one's dtype
        and of their parameter's shape and device (and none is in sparse-gradient mode, whose
        dense-gradient warning :func:`selected_gradient` gives); None otherwise."""
        grads = [p.grad for p in self.params]
        first = grads[0]
        if first is None:
            return None
        for p, grad in zip(self.params, grads):
            if (
                grad is None
                or grad.layout != torch.strided
                or grad.dtype != first.dtype
                or grad.device != p.device
                or grad.shape != p.shape
                or not grad.is_contiguous()
                or plan_of(p) is not None
            ):
                return None
        return grads

    def _empty(self, dtype: torch.dtype | None = None) -> Tensor:
        like = self.params[0]
        return torch.empty(self.numel, dtype=dtype or like.dtype, device=like.device)

    # -- the step's reads and writes ------------------------------------------------------
    def gather_gradients(self, dtype: torch.dtype | None = None) -> Tensor:
        """The selected gradient entries in ``dtype`` (None: the parameters'), a new buffer.

        One ``index_select`` where every ``.grad`` is its view of :attr:`grads`; otherwise one
        per parameter (float32 for 16-bit parameters in sparse-gradient mode gives the values
        accumulated in float32, see :func:`sparsetune.sparse_grad.selected_gradient`). With a
        :attr:`table` and dense gradients, one launch (cast in it where exact)."""
        if self.table is not None:
            grads = self._dense_gradients()
            if grads is not None:
                return self.table.gather(grads, self._empty(dtype))
        if self.grads is not None and all(
            p.grad is not None
            and not p.grad.is_sparse
            and p.grad.data_ptr() == ptr
            and p.grad.dtype == self.grads.dtype
            and p.grad.is_contiguous()
            for p, ptr in zip(self.params, self._grad_ptrs)
        ):
            grad = self.grads.index_select(0, self.index)
            return grad if dtype is None else grad.to(dtype)
        grad = self._empty(dtype)
        for p, sel, part in zip(self.params, self.selections, self.slices):
            selected_gradient(p, sel.index, out=grad[part])
        return grad

    def gather_values(self) -> Tensor:
        """The parameters' current selected values, in their dtype (a new buffer)."""
        if self._packed():
            return self.weights.index_select(0, self.index)
        if self.table is not None:
            return self.table.gather(self.params, self._empty())
        values = self._empty()
        for p, sel, part in zip(self.params, self.selections, self.slices):
            if sel.index is None:
                values[part].copy_(p.view(-1))
            else:
                torch.index_select(p.view(-1), 0, sel.index, out=values[part])
        return values

    def scatter_values(self, values: Tensor) -> None:
        """Write ``values`` (in the parameters' dtype) into the selected entries."""
        if self._packed():
            write_selected(self.weights, self.index, values)
            return
        if self.table is not None:
            self.table.scatter(self.params, values)
            return
        for p, sel, part in zip(self.params, self.selections, self.slices):
            sel.scatter_(p, values[part])


def _local_index(sel: Selection, device: torch.device) -> Tensor | None:
    """The selection's local flat indices for a :class:`GatherTable`: None for every entry,
    an empty index for none."""
    if sel.kind == "none":
        return torch.empty(0, dtype=torch.int64, device=device)
    return sel.index
