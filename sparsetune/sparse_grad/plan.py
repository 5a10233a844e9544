"""The per-weight plan of sparse-gradient mode: where the k selected entries are, which product
computes a Linear's weight gradient at them (the cost model over :data:`LINEAR_PRODUCTS`, among
those :data:`LINEAR_SUPPORT` can run), and the float32 accumulator of a 16-bit weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, ParameterMismatchError
from ..kernels import kernel_available
from .accumulate import Fp32Accumulator
from .products import (
    LINEAR_COSTS,
    LINEAR_PRODUCTS,
    LINEAR_SUPPORT,
    block_values,
    csr_template,
    kernel_values,
    linear_costs,
    linear_support,
    release_workspace,
    sampled_values,
)

__all__ = ["LINEAR_COSTS", "LINEAR_PRODUCTS", "LINEAR_SUPPORT", "Plan", "release_workspace"]


class Plan:
    """Selected entries of one 2-D weight, as sparse-gradient indices.

    ``indices``: (2, k) int64 row-major sorted (row, column) pairs, the indices of every sparse
    gradient this plan produces (shared, so the optimizer recognises them by identity).
    ``selected``: the (out, in) bool mask, or a ``(shape, indices)`` pair whose (2, k) int64
    row-major sorted indices on ``device`` the plan keeps as they are (no copy: a delta
    module's index buffer).
    """

    def __init__(
        self, name: str, selected: Tensor | tuple[tuple[int, int], Tensor],
        device: torch.device, linear_product: str = "auto", dtype: torch.dtype | None = None,
    ) -> None:
        self.name = name
        if isinstance(selected, tuple):
            shape, self.indices = selected
            self.shape = tuple(shape)
        else:
            self.shape = tuple(selected.shape)
            self.indices = torch.nonzero(selected).t().contiguous().to(device)
        self.count = self.indices.shape[1]
        self.device_type = torch.device(device).type
        #: The weight's dtype; a 16-bit one gets a float32 accumulator of its k gradient values.
        self.dtype = torch.float32 if dtype is None else dtype
        self.accumulator = (
            Fp32Accumulator(self.indices, self.shape) if self.dtype.itemsize < 4 else None
        )
        self._csr: dict[torch.dtype, Tensor] = {}
        self._flat: Tensor | None = None
        self._row_ptr: Tensor | None = None
        self._verified: Tensor | None = None
        self._linear_product = linear_product
        self._products: dict[tuple[str, torch.dtype], str] = {}
        self._blocks: tuple[Tensor | None, Tensor | None, Tensor] | None = None
        if linear_product != "auto":
            self.product_for(self.device_type, self.dtype)  # a forced product must run here

    # -- Linear ---------------------------------------------------------------------------
    @property
    def linear_product(self) -> str:
        """``"sampled"``, ``"blocks"`` or ``"sddmm"``: how :meth:`linear_values` computes for
        the weight's own device and dtype (see :data:`LINEAR_PRODUCTS`), chosen on first use."""
        return self.product_for(self.device_type, self.dtype)

    def product_for(self, device_type: str, dtype: torch.dtype) -> str:
        """The product for gradients of ``dtype`` on ``device_type`` (under autocast the
        gradient's dtype is not the weight's): the forced one, or the cheaper of those that
        can run there (:data:`LINEAR_SUPPORT`) by the device type's cost table
        (:data:`LINEAR_COSTS`). Raises where none can."""
        key = (device_type, dtype)
        product = self._products.get(key)
        if product is not None:
            return product
        forced = self._linear_product != "auto"
        candidates = [self._linear_product] if forced else list(_PRICED)
        runs = {c: linear_support(c, device_type, dtype) for c in candidates}
        costs = linear_costs(device_type)
        runs = {c: how for c, how in runs.items() if how is not None and (forced or (
            _PRICED[c] in costs and (c != "sddmm" or kernel_available(device_type, dtype))))}
        if not runs:
            allowed = [p for p in _PRICED if linear_support(p, device_type, dtype)]
            raise InvalidArgumentError(
                f"parameter '{self.name}': linear_product={self._linear_product!r} cannot "
                f"compute a {dtype} weight gradient on {device_type} (see LINEAR_SUPPORT); "
                f"products that can: {allowed}"
            )
        if len(runs) == 1:
            product = next(iter(runs))
        else:
            prices = self.linear_prices(device_type, runs.get("blocks") == "fp32")
            product = min(runs, key=lambda c: prices[c])
        self._products[key] = product
        return product

    def linear_prices(self, device_type: str, cast_blocks: bool = False) -> dict[str, float]:
        """Cost per token, in the table's ns, of each product ``device_type``'s table prices
        (:data:`LINEAR_COSTS`) for this weight; ``cast_blocks``: the blocks product casts its
        gathered operands to float32 (the sampled product's cast rides on its copies)."""
        out, inp = self.shape
        cost = linear_costs(device_type)
        rows, cols = (int(torch.unique(i).numel()) for i in self.indices)
        kept_rows = _compressed(rows, out, cols, cost)
        kept_cols = _compressed(cols, inp, rows, cost)
        blocks = cost["mac"] * kept_rows * kept_cols
        blocks += cost["gather"] * (kept_rows * (kept_rows < out) + kept_cols * (kept_cols < inp))
        if cast_blocks:
            blocks += cost["gather"] * (kept_rows + kept_cols)
        prices = {"blocks": blocks,
                  "sampled": cost["transpose"] * (out + inp) + cost["sampled_mac"] * self.count}
        if "sddmm_mac" in cost:
            prices["sddmm"] = cost["sddmm_mac"] * self.count
        return prices

    def block_layout(self) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(rows or None for all, columns or None for all, flat index of each selected entry
        in the rows x columns product)."""
        if self._blocks is None:
            out, inp = self.shape
            r, c = self.indices
            rows, r_local = torch.unique(r, return_inverse=True)
            cols, c_local = torch.unique(c, return_inverse=True)
            cost = linear_costs(self.device_type)
            keep_rows = _compressed(rows.numel(), out, cols.numel(), cost) < out
            keep_cols = _compressed(cols.numel(), inp, rows.numel(), cost) < inp
            if not keep_rows:
                rows, r_local = None, r
            if not keep_cols:
                cols, c_local = None, c
            width = inp if cols is None else cols.numel()
            self._blocks = (rows, cols, r_local * width + c_local)
        return self._blocks

    @property
    def flat(self) -> Tensor:
        """Flat row-major indices of the selected entries (the optimizers' order)."""
        if self._flat is None:
            self._flat = self.indices[0] * self.shape[1] + self.indices[1]
        return self._flat

    def sparse(self, values: Tensor) -> Tensor:
        return torch.sparse_coo_tensor(
            self.indices, values, self.shape, is_coalesced=True, check_invariants=False
        )

    def check_device(self, weight: Tensor) -> None:
        if weight.device != self.indices.device:
            raise InvalidArgumentError(
                f"parameter '{self.name}' is on {weight.device} but sparse-gradient mode was "
                f"prepared on {self.indices.device}; move the model first, then call prepare()"
            )

    def linear_values(self, grad_out: Tensor, inputs: Tensor) -> Tensor:
        """(g^T x) at the selected (row, column) pairs; g: (N, out), x: (N, in) -> (k,), in
        float32 for 16-bit operands (float32 accumulation, see :mod:`.products`)."""
        device_type, dtype = grad_out.device.type, grad_out.dtype
        product = self.product_for(device_type, dtype)
        how = linear_support(product, device_type, dtype)
        if product == "blocks":
            return block_values(grad_out, inputs, *self.block_layout(), how)
        if product == "sddmm":
            return kernel_values(grad_out, inputs, self.indices)
        compute = dtype if how == "native" else torch.float32
        template = self._csr.get(compute)
        if template is None:
            template = self._csr[compute] = csr_template(self.indices, self.shape, compute)
        return sampled_values(template, grad_out, inputs)

    def gradient(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """The sparse gradient in the weight's ``dtype`` of the k ``values`` one backward
        computes; a 16-bit weight's accumulator also sums them in float32."""
        if self.accumulator is not None:
            self.accumulator.add(values)
        return self.sparse(values.to(dtype))

    # -- Embedding ------------------------------------------------------------------------
    def embedding_values(
        self, ids: Tensor, grad_out: Tensor, padding_idx: int | None, scale_grad_by_freq: bool
    ) -> Tensor:
        """Embedding weight gradient at the selected entries; ids: (N,), g: (N, dim) -> (k,),
        in float32 for a 16-bit ``g``."""
        if padding_idx is not None:
            keep = ids != padding_idx
            ids, grad_out = ids[keep], grad_out[keep]
        rows, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        if grad_out.dtype.itemsize < 4:  # sum repeated tokens in float32
            grad_out = grad_out.float()
        row_grads = torch.zeros(rows.numel(), self.shape[1], dtype=grad_out.dtype,
                                device=grad_out.device).index_add_(0, inverse, grad_out)
        if scale_grad_by_freq:
            row_grads /= counts.unsqueeze(1).to(row_grads.dtype)
        if self._row_ptr is None:
            ptr = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=ids.device)
            ptr[1:] = torch.cumsum(torch.bincount(self.indices[0], minlength=self.shape[0]), 0)
            self._row_ptr = ptr
        # The selected entries of the batch's rows: a ragged range of pairs per row.
        starts = self._row_ptr[rows]
        lengths = self._row_ptr[rows + 1] - starts
        local = torch.repeat_interleave(torch.arange(rows.numel(), device=ids.device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        pairs = torch.arange(int(lengths.sum()), device=ids.device) + (starts - offsets)[local]
        values = torch.zeros(self.count, dtype=grad_out.dtype, device=grad_out.device)
        values[pairs] = row_grads[local, self.indices[1, pairs]]
        return values

    # -- reading gradients back -----------------------------------------------------------
    def values_of(self, grad: Tensor, index: Tensor | None) -> Tensor | None:
        """The k gradient values of a sparse ``grad`` this plan produced, or None if foreign.

        ``index``: the flat row-major indices of the entries the reader selects (None: all);
        they must be this plan's. Checked once per index tensor (recognised by identity).
        """
        if index is None or self._verified is not index:
            if index is None or not torch.equal(index.to(torch.int64), self.flat):
                raise ParameterMismatchError(
                    f"parameter '{self.name}': the optimizer's mask selects other entries than "
                    f"the mask given to sparsetune.prepare(); use the same mask for both"
                )
            self._verified = index
        if grad._indices().data_ptr() == self.indices.data_ptr() and grad._nnz() == self.count:
            return grad._values()
        grad = grad.coalesce()  # accumulated over several backward passes
        if grad._nnz() == self.count and torch.equal(grad._indices(), self.indices):
            return grad._values()
        return None


# The constant of each product in a cost table; a table without it never picks the product.
_PRICED = {"sampled": "sampled_mac", "blocks": "mac", "sddmm": "sddmm_mac"}


def _compressed(used: int, total: int, other: int, cost: dict[str, float]) -> int:
    """Rows (or columns) the blocks product keeps: the ``used`` ones when gathering them costs
    less than the multiply-adds it saves against ``other`` columns (rows), else all."""
    saved = cost["mac"] * (total - used) * other
    return used if cost["gather"] * used < saved else total
