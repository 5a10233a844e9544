"""Sparse-gradient training: backward computes only the gradient entries a mask selects.

A masked optimizer alone still pays for every dense weight gradient (for a Linear, half of the
backward's matrix products; for a word embedding, a vocabulary-sized buffer) only to discard
all but a fraction p of it. :func:`prepare` reroutes the forward of every ``nn.Linear`` and
``nn.Embedding`` whose weight is partly selected through an autograd function whose backward
returns the gradient at the selected entries only (theory/ E1: only M dtheta is trained):

* Linear, y = x W^T + b: the input gradient dL/dx = g W is dense (it flows on), the weight
  gradient is (g^T x)[r, c] = sum_n g[n, r] x[n, c] at the k selected pairs (r, c) only, n
  running over every token of the batch: either k sampled dot products
  (``torch.sparse.sampled_addmm``) or one dense product over just the rows and columns the
  mask touches, whichever costs less for that weight (:data:`LINEAR_PRODUCTS`);
* Embedding: the gradient rows of the token ids in the batch (index_add over the batch), read at
  the selected entries of those rows; every other selected entry gets 0, as in the dense path.

The k values arrive in ``weight.grad`` as a coalesced sparse COO tensor whose indices are the
selected positions in row-major order, so gradient accumulation, ``zero_grad`` and GradScaler
keep working; :class:`~sparsetune.SparseAdamW` and :class:`~sparsetune.SparseSGD` read the
values directly (no dense gradient is ever built). Biases and LayerNorm parameters keep their
ordinary (small) dense gradients. Parameters with no selected entry stop requiring grad (input
gradients still flow through them). A partly selected weight of any other layer type keeps its
dense gradient (the masked dense path), with a :class:`SparseGradientFallbackWarning` naming it.

Dense optimizers cannot use these gradients: ``torch.optim`` optimizers and
:class:`~sparsetune.MaskedOptimizer` raise on them, and ``torch.nn.utils.clip_grad_norm_``
raises too; clip with :meth:`SparseAdamW.clip_grad_norm_ <sparsetune.SparseAdamW>` instead.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ._selection import Selection

__all__ = [
    "LINEAR_COSTS", "LINEAR_PRODUCTS", "SparseGradientFallbackWarning", "SparseGradients",
    "prepare",
]

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


class SparseGradientFallbackWarning(UserWarning):
    """A partly selected weight keeps its dense gradient (a layer type :func:`prepare` skips)."""


# Parameters whose gradients are compact, and how their sparse gradient is laid out.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_WARNED_DENSE: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Plan:
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
        self._verified: Selection | None = None
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

    def _block_layout(self) -> tuple[Tensor | None, Tensor | None, Tensor]:
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
        """Flat row-major indices of the selected entries (the :class:`Selection` order)."""
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
            rows, cols, local = self._block_layout()
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
    def values_of(self, grad: Tensor, selection: Selection) -> Tensor | None:
        """The k gradient values of a sparse ``grad`` this plan produced, or None if foreign."""
        if self._verified is not selection:
            if selection.kind != "some" or not torch.equal(
                selection.index.to(torch.int64), self.flat
            ):
                raise ParameterMismatchError(
                    f"parameter '{self.name}': the optimizer's mask selects other entries than "
                    f"the mask given to sparsetune.prepare(); use the same mask for both"
                )
            self._verified = selection
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


def _release_workspace() -> None:
    for slot in ("grad", "input", "last_input"):
        if hasattr(_WORKSPACE, slot):
            delattr(_WORKSPACE, slot)


def _compressed(used: int, total: int, other: int) -> int:
    """Rows (or columns) the blocks product keeps: the ``used`` ones when gathering them costs
    less than the multiply-adds it saves against ``other`` columns (rows), else all."""
    saved = LINEAR_COSTS["mac"] * (total - used) * other
    return used if LINEAR_COSTS["gather"] * used < saved else total


class _SampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
            grad_w = ctx.plan.sparse(ctx.plan.linear_values(g, x2).to(weight.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class _SampledEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight: Tensor, plan: _Plan, padding_idx: int | None,
        scale_grad_by_freq: bool,
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.plan, ctx.padding_idx, ctx.scale = plan, padding_idx, scale_grad_by_freq
        ctx.weight_dtype = weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        values = ctx.plan.embedding_values(ids.reshape(-1), g, ctx.padding_idx, ctx.scale)
        return None, ctx.plan.sparse(values.to(ctx.weight_dtype)), None, None, None


class _CompactForward:
    """Replaces ``module.forward`` (as an instance attribute) while the mode is on."""

    def __init__(self, module: nn.Module, plan: _Plan) -> None:
        self.module, self.plan = module, plan

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        tracked = torch.is_grad_enabled() and m.weight.requires_grad
        if isinstance(m, nn.Linear):
            if not tracked:
                return F.linear(x, m.weight, m.bias)
            self.plan.check_device(m.weight)
            return _SampledLinear.apply(x, m.weight, m.bias, self.plan)
        if not tracked:
            return F.embedding(x, m.weight, m.padding_idx, None, m.norm_type,
                               m.scale_grad_by_freq, m.sparse)
        self.plan.check_device(m.weight)
        return _SampledEmbedding.apply(x, m.weight, self.plan, m.padding_idx,
                                       m.scale_grad_by_freq)


def _covered(module: nn.Module) -> bool:
    """A stock Linear or Embedding whose forward nobody has replaced."""
    if "forward" in module.__dict__:
        return False
    if type(module).forward is nn.Linear.forward:
        return True
    return type(module).forward is nn.Embedding.forward and module.max_norm is None


class SparseGradients:
    """Handle of the sparse-gradient mode on one model (see :func:`prepare`).

    Attributes (parameter names as in ``model.named_parameters()``):
        compact: parameters whose gradient holds only the selected entries.
        dense: selected parameters that keep dense gradients (biases, norms, fully selected
            tensors, and ``fallback``).
        fallback: partly selected weights of layers not covered (dense masked path, warned).
        frozen: parameters with no selected entry, whose ``requires_grad`` was turned off.
    """

    def __init__(self) -> None:
        self.compact: list[str] = []
        self.dense: list[str] = []
        self.fallback: list[str] = []
        self.frozen: list[str] = []
        self._modules: list[nn.Module] = []
        self._params: list[Tensor] = []
        self._frozen_params: list[Tensor] = []
        self.active = True

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"SparseGradients({state}: {len(self.compact)} compact, {len(self.dense)} dense, "
                f"{len(self.fallback)} fallback, {len(self.frozen)} frozen)")

    def __enter__(self) -> SparseGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Leave the model as it was: its modules' forwards and ``requires_grad`` flags.

        A compact gradient still pending in a weight's ``.grad`` becomes a dense tensor with
        zeros at the frozen entries, so an optimizer step taken after ``remove()`` gives the
        same result. Calling it twice does nothing.
        """
        if not self.active:
            return
        for module in self._modules:
            module.__dict__.pop("forward", None)
        for p in self._params:
            _PLANS.pop(p, None)
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        for p in self._frozen_params:
            p.requires_grad_(True)
        _release_workspace()
        self._modules, self._params, self._frozen_params = [], [], []
        self.active = False


def prepare(model: nn.Module, mask: Mask, *, linear_product: str = "auto") -> SparseGradients:
    """Turn on sparse-gradient training for ``model`` with ``mask``; returns the handle.

    Use the same ``mask`` for the optimizer (:class:`~sparsetune.SparseAdamW` or
    :class:`~sparsetune.SparseSGD`), built before or after this call. Call
    ``handle.remove()`` (or use the handle as a context manager) to restore the model. Prepare
    after moving the model to its device and dtype.

    ``linear_product`` chooses how Linear weight gradients are computed at the mask: one of
    :data:`LINEAR_PRODUCTS` (``"auto"``: the cheaper of ``"sampled"`` and ``"blocks"`` per
    weight by :data:`LINEAR_COSTS`; the values agree to rounding).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                             torch.nn.Linear(3, 1))
        >>> bits = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}
        >>> bits["0.weight"][0, 0], bits["0.weight"][1, 0] = True, False
        >>> handle = prepare(model, Mask.from_dict(bits))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> model[0].weight.grad.is_sparse
        True
        >>> handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mask, Mask):
        raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
    if linear_product not in LINEAR_PRODUCTS:
        raise InvalidArgumentError(
            f"linear_product must be one of {list(LINEAR_PRODUCTS)}, got {linear_product!r}"
        )
    mask.check(model)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in mask]
    if missing:
        raise ParameterMismatchError(
            f"prepare: trainable parameters missing from the mask: {missing}; build the mask "
            f"over every trainable parameter (or turn their requires_grad off)"
        )
    if any(p in _PLANS for p in params.values()):
        raise InvalidArgumentError(
            "prepare: this model is already in sparse-gradient mode; call remove() on its "
            "handle first"
        )
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)

    handle = SparseGradients()
    uncovered = []
    for name, p in params.items():
        if name not in mask:
            continue  # not trainable (checked above)
        selected = mask[name]
        count = int(torch.count_nonzero(selected))
        if count == 0:
            if p.requires_grad:
                p.requires_grad_(False)
                handle.frozen.append(name)
                handle._frozen_params.append(p)
            continue
        if not p.requires_grad:
            continue
        mods = owners.get(id(p), [])
        as_weight = [m for m in mods if getattr(m, "weight", None) is p and _covered(m)]
        if count == selected.numel() or not as_weight:
            handle.dense.append(name)
            if count < selected.numel() and p.dim() >= 2:
                uncovered.append(f"{name} ({', '.join(type(m).__name__ for m in mods)})")
                handle.fallback.append(name)
            continue
        plan = _Plan(name, selected, p.device, linear_product)
        _PLANS[p] = plan
        handle._params.append(p)
        handle.compact.append(name)
        for m in as_weight:
            m.forward = _CompactForward(m, plan)
            handle._modules.append(m)
        others = [m for m in mods if m not in as_weight]
        if others:
            uncovered.append(f"{name} (also used by {', '.join(type(m).__name__ for m in others)})")
            handle.fallback.append(name)
    if uncovered:
        warnings.warn(
            f"sparse-gradient mode covers nn.Linear and nn.Embedding (without max_norm); these "
            f"partly selected weights keep dense gradients (correct, but nothing is saved): "
            f"{uncovered}",
            SparseGradientFallbackWarning,
            stacklevel=2,
        )
    return handle


def selected_gradient(param: Tensor, selection: Selection, out: Tensor | None = None) -> Tensor:
    """The gradient of ``param`` at its selected entries, 1-D in row-major order.

    A dense ``param.grad`` is gathered; a compact gradient from :func:`prepare` is read as is
    (a view of its values unless ``out`` is given, which receives a copy).
    """
    grad = param.grad
    plan = _PLANS.get(param)
    if not grad.is_sparse:
        if plan is not None and param not in _WARNED_DENSE:
            _WARNED_DENSE[param] = True
            warnings.warn(
                f"parameter '{plan.name}' is in sparse-gradient mode but received a dense "
                f"gradient: its weight is used outside its module's forward (for example by "
                f"nn.MultiheadAttention); the result stays exact, but nothing is saved for it",
                SparseGradientFallbackWarning,
                stacklevel=3,
            )
        if out is None:
            return selection.gather(grad)
        if selection.index is None:
            return out.copy_(grad.reshape(-1))
        return torch.index_select(grad.reshape(-1), 0, selection.index, out=out)
    values = plan.values_of(grad, selection) if plan is not None else None
    if values is None:
        raise InvalidArgumentError(
            "sparse gradients are supported only as produced by sparsetune.prepare(); got one "
            "from elsewhere (nn.Embedding(sparse=True)?): use dense gradients"
        )
    return values if out is None else out.copy_(values)


def compact_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, parameter)`` of ``model`` whose gradients are compact (for tests and reports)."""
    for name, p in model.named_parameters():
        if p in _PLANS:
            yield name, p
