"""The per-weight plan of sparse-gradient mode: where the k selected entries are, and the cost
model that picks how a Linear's weight gradient is computed at them (:data:`LINEAR_PRODUCTS`).
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, ParameterMismatchError

__all__ = ["LINEAR_COSTS", "LINEAR_PRODUCTS", "Plan", "release_workspace"]


#: How the weight gradient of a Linear is computed at its k selected entries (``prepare``'s
#: ``linear_product``): ``"sampled"`` takes k dot products over the batch
#: (``torch.sparse.sampled_addmm``, which needs both operands copied into a transposed layout);
#: ``"blocks"`` gathers the R rows and C columns the mask touches and takes one dense R x C
#: product (BLAS, no transposed copies), then reads the k entries from it (R = out, C = in is
#: the plain dense product); ``"auto"`` picks the cheaper per weight by :data:`LINEAR_COSTS`.
LINEAR_PRODUCTS = ("auto", "sampled", "blocks")

#: Cost per token of the operations above, in ns, from microbenchmarks at MiniLM's shapes on a
#: 2-core x86 VM with torch's CPU build (672 tokens, 384 x 384 and 1536 x 384 weights, inside
#: a training step where copies run slower than alone): a multiply-add inside a dense
#: matrix product, one inside the sampled product, an element of a transposed copy (memory
#: bound) and an element gathered along a row. Only their ratios matter: a dense product runs
#: some 10 times faster per multiply-add than the sampled one and 100 times faster than a
#: transposed copy per element, so the sampled product wins only on wide layers at low density.
LINEAR_COSTS = {"mac": 0.0055, "sampled_mac": 0.055, "transpose": 0.8, "gather": 0.4}


class Plan:
    """Selected entries of one 2-D weight, as sparse-gradient indices.

    ``indices``: (2, k) int64 row-major sorted (row, column) pairs, the indices of every sparse
    gradient this plan produces (shared, so the optimizer recognises them by identity).
    """

    def __init__(
        self, name: str, selected: Tensor, device: torch.device, linear_product: str = "auto"
    ) -> None:
        self.name = name
        self.shape = tuple(selected.shape)
        self.indices = torch.nonzero(selected).t().contiguous().to(device)
        self.count = self.indices.shape[1]
        self._csr: dict[torch.dtype, Tensor] = {}
        self._flat: Tensor | None = None
        self._row_ptr: Tensor | None = None
        self._verified: Tensor | None = None
        self._linear_product = linear_product
        self._blocks: tuple[Tensor | None, Tensor | None, Tensor] | None = None

    # -- Linear ---------------------------------------------------------------------------
    @property
    def linear_product(self) -> str:
        """``"sampled"`` or ``"blocks"``: how :meth:`linear_values` computes (see
        :data:`LINEAR_PRODUCTS`), chosen on first use."""
        if self._linear_product == "auto":
            self._linear_product = self._cheaper_linear_product()
        return self._linear_product

    def _cheaper_linear_product(self) -> str:
        out, inp = self.shape
        rows, cols = (int(torch.unique(i).numel()) for i in self.indices)
        kept_rows, kept_cols = _compressed(rows, out, cols), _compressed(cols, inp, rows)
        cost = LINEAR_COSTS
        blocks = cost["mac"] * kept_rows * kept_cols
        blocks += cost["gather"] * (kept_rows * (kept_rows < out) + kept_cols * (kept_cols < inp))
        sampled = cost["transpose"] * (out + inp) + cost["sampled_mac"] * self.count
        return "sampled" if sampled < blocks else "blocks"

    def block_layout(self) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(rows or None for all, columns or None for all, flat index of each selected entry
        in the rows x columns product)."""
        if self._blocks is None:
            out, inp = self.shape
            r, c = self.indices
            rows, r_local = torch.unique(r, return_inverse=True)
            cols, c_local = torch.unique(c, return_inverse=True)
            keep_rows = _compressed(rows.numel(), out, cols.numel()) < out
            keep_cols = _compressed(cols.numel(), inp, rows.numel()) < inp
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
        """(g^T x) at the selected (row, column) pairs; g: (N, out), x: (N, in) -> (k,)."""
        if self.linear_product == "blocks":
            rows, cols, local = self.block_layout()
            g = grad_out if rows is None else grad_out.index_select(1, rows)
            x = inputs if cols is None else inputs.index_select(1, cols)
            return (g.t() @ x).view(-1).index_select(0, local)
        template = self._csr.get(grad_out.dtype)
        if template is None:
            crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=grad_out.device)
            crow[1:] = torch.cumsum(torch.bincount(self.indices[0], minlength=self.shape[0]), 0)
            values = torch.zeros(self.count, dtype=grad_out.dtype, device=grad_out.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, fine
                warnings.simplefilter("ignore", UserWarning)
                template = torch.sparse_csr_tensor(
                    crow, self.indices[1], values, self.shape, check_invariants=False
                )
            self._csr[grad_out.dtype] = template
        # sampled_addmm reads mat1 row-major and mat2 column-major: give it both as copies in
        # that layout (x^T is shared by the query, key and value projections of one input).
        product = torch.sparse.sampled_addmm(
            template, _transpose_into(grad_out, "grad"), _transposed(inputs).t(), beta=0.0
        )
        return product.values()

    # -- Embedding ------------------------------------------------------------------------
    def embedding_values(
        self, ids: Tensor, grad_out: Tensor, padding_idx: int | None, scale_grad_by_freq: bool
    ) -> Tensor:
        """Embedding weight gradient at the selected entries; ids: (N,), g: (N, dim) -> (k,)."""
        if padding_idx is not None:
            keep = ids != padding_idx
            ids, grad_out = ids[keep], grad_out[keep]
        rows, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
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


# Per-thread scratch buffers for the transposed operands of the sampled products. Reusing them
# avoids a fresh multi-megabyte allocation per layer, which on CPU costs as much as the copy
# (the pages are mapped and zeroed by the kernel on first touch).
_WORKSPACE = threading.local()


def _transpose_into(x: Tensor, slot: str) -> Tensor:
    """``x.t().contiguous()`` written into this thread's scratch buffer ``slot`` (reused)."""
    n, c = x.shape
    buf = getattr(_WORKSPACE, slot, None)
    if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype or buf.device != x.device:
        buf = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        setattr(_WORKSPACE, slot, buf)
    return buf[: x.numel()].view(c, n).copy_(x.t())


def _transposed(x: Tensor) -> Tensor:
    """``x.t().contiguous()``, reused when the same unchanged tensor is asked for again.

    The query, key and value projections of one input share it. The result lives in the
    thread's ``"input"`` scratch buffer until a different tensor is transposed.
    """
    key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.dtype,
           x.device, x._version)
    last = getattr(_WORKSPACE, "last_input", None)
    if last is not None and last[0] == key:
        return last[2]
    xt = _transpose_into(x, "input")
    _WORKSPACE.last_input = (key, x, xt)  # holding x keeps its storage from being reused
    return xt


def release_workspace() -> None:
    """Free this thread's scratch buffers (when sparse-gradient mode ends)."""
    for slot in ("grad", "input", "last_input"):
        if hasattr(_WORKSPACE, slot):
            delattr(_WORKSPACE, slot)


def _compressed(used: int, total: int, other: int) -> int:
    """Rows (or columns) the blocks product keeps: the ``used`` ones when gathering them costs
    less than the multiply-adds it saves against ``other`` columns (rows), else all."""
    saved = LINEAR_COSTS["mac"] * (total - used) * other
    return used if LINEAR_COSTS["gather"] * used < saved else total
