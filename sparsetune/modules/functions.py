"""The autograd functions of a sparse delta over a frozen layer: delta(x) for S with k entries.

For a Linear (W0: (out, in)), S holds k values v at (row r_j, column c_j) and the delta of the
output is (x S^T)[n, r_j] += x[n, c_j] v_j: S in CSR order, every output feature r a weighted
"bag" of input features, ``embedding_bag`` over the (in, N) transposed input (k N multiply-adds
plus two transposed copies; 10x faster than gathering the k input columns and
``index_add``-ing them). On the CPU in fp32/fp64 the row products read x and write the output
row-major, with no transposed copy: the C kernel :func:`~sparsetune.kernels.native_spmm_add_`
(compiled on first use; up to :data:`NATIVE_PER_LINE` entries per row plus column of M, 2-4x
faster than MKL below that), or, without a C compiler, MKL's CSR product written into a
transposed output (up to :data:`CSR_PER_LINE`; it costs some 15x more per multiply-add than the
bags, so it loses on denser layers). Which product a layer takes is a fixed rule of its shapes
(the same summation order in every run of one installation). Results are
returned row-major: a transposed result slows every later op on it some 5x on CPU. Nothing
dense of W's size is built: neither W0 + S nor S. The backward gives

* the input gradient through S: g S, the same bags over S^T's CSR order (the gradient through
  W0 comes from the base layer's own autograd);
* the k values' gradient: dL/dv_j = sum_n g[n, r_j] x[n, c_j], the sampled product of
  :class:`sparsetune.sparse_grad.Plan` (``linear_values``: blocks, sampled or the Triton SDDMM
  kernel, whichever is cheapest where it runs; 16-bit operands with float32 accumulation).

On the C kernel's route the fused layer takes both in one pass,
:meth:`CsrLayout.fused_backward` (:func:`~sparsetune.kernels.native_spmm_backward_`): each
g[n, r_j] gathered for the input gradient is also multiplied by x[n, c_j] for the values'
gradient, so the sampled product needs no transposed copies of g and x of its own (the input
gradient and the plan's sampled product are its twins, which the hook route takes).

transformers' Conv1D stores W as (in, out): the same function with the coordinates swapped.
A plain nn.Linear or Conv1D takes the base product and its deltas as one function,
:class:`LinearWithDeltas` (the deltas added into the base output in place and the input
gradient into one buffer); the base layer followed by :class:`LinearDelta` is its slow twin
and serves every other Linear (quantized or subclassed weights, autocast). Where Triton runs
(CUDA), its in-place adds take :func:`~sparsetune.kernels.spmm_add_`: the bags' sums read in
the input's own dtype straight from the transposed input and added into the output tile in
float32, rounded once (no float32 copy of the input, no transposed result, no separate add).
For an Embedding the delta of row ``id`` is added to every token with that id, and the
values' gradient is :meth:`Plan.embedding_values <sparsetune.sparse_grad.Plan>`.

Precision: the delta is computed in the values' dtype (float32; float64 for a float64 base):
16-bit inputs and gradients are cast to it, so sums accumulate in float32; the result is cast
to the base output's dtype where it is added (``output + delta``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels import (
    kernel_available,
    native_available,
    native_spmm_add_,
    native_spmm_backward_,
    spmm_add_,
)
from ..sparse_grad import Plan

__all__ = ["CSR_PER_LINE", "DELTA_KERNEL", "NATIVE", "NATIVE_PER_LINE", "CsrLayout", "DeltaSpec",
           "EmbeddingDelta", "LinearDelta", "LinearWithDeltas"]

#: The most entries per row plus column of M (k / (a + b)) at which the CPU products take MKL's
#: CSR product. Measured on the 2-core x86 VM at 1 thread (N = 512-1024 tokens): the CSR
#: product costs ~0.6 ns per entry-token, the bags ~0.04 ns per entry-token plus ~1 ns per
#: element of their two transposed copies (N (a + b)), so the CSR product is the cheaper below
#: k ~ 1.8 (a + b): MiniLM's 0.5% layers (k / (a + b) ~ 1-1.5) take it, LoRA-count q/v masks
#: (7.3% of 512 x 512, k / (a + b) ~ 19) the bags, 4-6x faster there.
CSR_PER_LINE = 1.8

#: The most entries per row plus column of M at which the CPU products take the C kernel
#: (:func:`~sparsetune.kernels.native_spmm_add_`); above it, the bags. Measured by
#: ``benchmarks/delta_products.py`` (2-core x86 VM, 2 threads, N = 1024; MiniLM's shapes,
#: 512 x 512, 2048 x 2048): the kernel is the fastest route at every shape up to k / (a + b) = 8
#: (0.4-2 ms at <= 2, 2-4x faster than MKL's CSR product, 3-10x than the bags), the three are
#: within ~25% of each other at 16, and the bags are fastest at 32.
NATIVE_PER_LINE = 10.0

#: Whether the CPU row products take the C kernel where it compiles (False: MKL's, the twin).
NATIVE = True

#: Whether the in-place products take the Triton kernel where it runs (CUDA with Triton; the
#: interpreter in tests). False: the embedding-bag twin (``benchmarks/gpu.py``'s bags row).
DELTA_KERNEL = True


class CsrLayout:
    """An (a, b) matrix M with entries at (rows_j, cols_j), kept in CSR order (and M^T's):
    ``right(values, d)`` = d @ M^T for d: (N, b) and ``left(values, g)`` = g @ M for g: (N, a),
    dense and row-major in and out; no dense M is built (module docstring)."""

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> None:
        key = rows * shape[1] + cols
        self.perm = None if bool((key[1:] >= key[:-1]).all()) else torch.argsort(key)
        if self.perm is not None:
            rows, cols = rows[self.perm], cols[self.perm]
        self.crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
        self.crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
        self.col, self.shape = cols.contiguous(), shape
        # M^T in CSR order: rows sorted by column (stable), positions into the CSR order of M;
        # int32 where it fits (half the bytes; M's own arrays share the caller's int64 indices)
        small = torch.int32 if max(cols.numel(), *shape) < 2**31 else torch.int64
        self.perm_t = torch.argsort(cols * shape[0] + rows).to(small)
        self.crow_t = torch.zeros(shape[1] + 1, dtype=small, device=rows.device)
        self.crow_t[1:] = torch.cumsum(torch.bincount(cols, minlength=shape[1]), 0)
        self.col_t = rows[self.perm_t].to(small).contiguous()

    def cpu_route(self, values: Tensor) -> str | None:
        """Which row product serves these values: ``"native"`` (the C kernel, where it
        compiles and :data:`NATIVE`) up to :data:`NATIVE_PER_LINE` entries per row plus column
        of M, else ``"mkl"`` (MKL's CSR product) up to :data:`CSR_PER_LINE`, for fp32/fp64
        values on the CPU; None: the embedding bags (:func:`_bags`). A fixed rule of the
        shapes, so every run and every process of one installation sums in the same order."""
        if not _csr_mm_ok(values):
            return None
        native = _native_ok()
        limit = NATIVE_PER_LINE if native else CSR_PER_LINE
        if values.numel() > limit * sum(self.shape):
            return None
        return "native" if native else "mkl"

    def uses_csr(self, values: Tensor) -> bool:
        """Whether the products take a CSR row product (:meth:`cpu_route`: the C kernel or
        MKL's) rather than the embedding bags."""
        return self.cpu_route(values) is not None

    def _product(self, crow: Tensor, cols: Tensor, v: Tensor, shape: tuple[int, int],
                 dense: Tensor) -> Tensor:
        """dense @ M'^T for M' = (crow, cols, v) of ``shape`` (:meth:`uses_csr` decides how)."""
        dense = dense.to(v.dtype)
        route = self.cpu_route(v)
        if route is not None:
            return _csr_mm(crow, cols, v, shape, dense, native=route == "native")
        return _bags(cols, crow, v, dense.t().contiguous())

    def right(self, values: Tensor, dense: Tensor) -> Tensor:
        """dense @ M^T in ``values.dtype``; dense: (N, b) -> (N, a)."""
        v = values if self.perm is None else values[self.perm]
        return self._product(self.crow, self.col, v, self.shape, dense)

    def kernel_adds(self, out: Tensor, dense: Tensor, values: Tensor) -> bool:
        """Whether :meth:`add_right_` / :meth:`add_left_` take the Triton kernel
        (:func:`~sparsetune.kernels.spmm_add_`): :data:`DELTA_KERNEL` and the kernel runs for
        every operand's device and dtype (CUDA with Triton; the interpreter in tests)."""
        return DELTA_KERNEL and all(kernel_available(t.device.type, t.dtype)
                                    for t in (out, dense, values))

    def _add(self, out: Tensor, crow: Tensor, cols: Tensor, v: Tensor,
             shape: tuple[int, int], dense: Tensor, twin: Callable[[], Tensor]) -> Tensor:
        """out += dense @ M'^T for M' = (crow, cols, v) of ``shape``: the CSR row product of
        :meth:`cpu_route` (all three in one dtype), the Triton kernel where
        :meth:`kernel_adds` (float32 sums rounded once into out), else ``twin()`` added."""
        route = self.cpu_route(v) if out.dtype == v.dtype == dense.dtype else None
        if route is not None:
            return _csr_add_(out, crow, cols, v, shape, dense, native=route == "native")
        if self.kernel_adds(out, dense, v):
            return spmm_add_(out, dense.t().contiguous(), crow, cols, v)
        return out.add_(twin().to(out.dtype))

    def add_right_(self, out: Tensor, values: Tensor, dense: Tensor) -> Tensor:
        """out += dense @ M^T in place, for out: (N, a) row-major, dense: (N, b): a CSR row
        product written into out (:func:`_csr_add_`), the Triton kernel, or ``right``'s result
        added (:meth:`_add`)."""
        v = values if self.perm is None else values[self.perm]
        return self._add(out, self.crow, self.col, v, self.shape, dense,
                         lambda: self.right(values, dense))

    def add_left_(self, out: Tensor, values: Tensor, dense: Tensor) -> Tensor:
        """out += dense @ M in place, for out: (N, b) row-major, dense: (N, a) (as
        :meth:`add_right_`, over M^T's CSR order)."""
        v = values if self.perm is None else values[self.perm]
        return self._add(out, self.crow_t, self.col_t, v[self.perm_t], self.shape[::-1], dense,
                         lambda: self.left(values, dense))

    def fused_backward(self, grad_x: Tensor | None, values: Tensor, g: Tensor,
                       x: Tensor) -> Tensor | None:
        """The backward of out = x M^T in one pass of the C kernel
        (:func:`~sparsetune.kernels.native_spmm_backward_`): g M added into ``grad_x`` ((N, b);
        None skips it) and the values' gradient sum_n g[n, r_j] x[n, c_j] returned in
        ``values``' order. Only where :meth:`cpu_route` is ``"native"`` and g: (N, a), x: (N, b),
        values (and grad_x) share its dtype with unit last strides; else None, and the caller
        takes :meth:`add_left_` and the plan's sampled product (the twins)."""
        dense = (g, x) if grad_x is None else (grad_x, g, x)
        if (self.cpu_route(values) != "native" or any(t.dtype != values.dtype for t in dense)
                or not all(_unit_last(t) for t in dense)):
            return None
        v = values if self.perm is None else values[self.perm]
        grad_t = native_spmm_backward_(grad_x, g, x, self.crow_t, self.col_t, v[self.perm_t],
                                       check=False)
        grad = torch.empty_like(grad_t)
        grad[self.perm_t if self.perm is None else self.perm[self.perm_t]] = grad_t
        return grad

    def left(self, values: Tensor, dense: Tensor) -> Tensor:
        """dense @ M in ``values.dtype``; dense: (N, a) -> (N, b)."""
        v = values if self.perm is None else values[self.perm]
        return self._product(self.crow_t, self.col_t, v[self.perm_t], self.shape[::-1], dense)


def _csr_mm_ok(values: Tensor) -> bool:
    """Whether :func:`_csr_mm` serves these values: fp32/fp64 on the CPU (MKL's CSR x dense
    product; other dtypes and devices take :func:`_bags`, its twin)."""
    return values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)


def _native_ok() -> bool:
    """Whether the CPU row products take the C kernel: :data:`NATIVE` and it compiled."""
    return NATIVE and native_available()


def _csr_add_(out: Tensor, crow: Tensor, cols: Tensor, values: Tensor,
              shape: tuple[int, int], dense: Tensor, native: bool = False) -> Tensor:
    """out += dense @ M^T for M: (a, b) in CSR (crow, cols, values), dense: (N, b), out:
    (N, a) row-major, neither operand nor the result copied into a transposed layout (which
    costs more than the product itself on the CPU): the C kernel where ``native`` and both have
    unit last strides, else MKL's CSR product M dense^T written into out's (a, N)
    column-major transpose."""
    if native and _unit_last(out) and _unit_last(dense) and crow.dtype == cols.dtype:
        return native_spmm_add_(out, dense, crow, cols, values, check=False)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, fine
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
    out.t().addmm_(matrix, dense.t())
    return out


def _unit_last(t: Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def _csr_mm(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int],
            dense: Tensor, native: bool = False) -> Tensor:
    """dense @ M^T for M: (a, b) in CSR (crow, cols, values) and dense: (N, b) -> (N, a)
    row-major (:func:`_csr_add_` into zeros)."""
    out = torch.zeros(dense.shape[0], shape[0], dtype=values.dtype, device=values.device)
    return _csr_add_(out, crow, cols, values, shape, dense, native=native)


def _bags(cols: Tensor, crow: Tensor, values: Tensor, table: Tensor) -> Tensor:
    """(M table)^T for M in CSR (crow, cols, values) and table: (b, N) -> (N, a)."""
    out = torch.nn.functional.embedding_bag(cols, table, crow, mode="sum",
                                            per_sample_weights=values, include_last_offset=True)
    return out.t().contiguous()


class LinearDelta(torch.autograd.Function):
    """delta(x) = x S^T for a Linear's S (``transposed=False``; entries (out, in)) or x S for a
    Conv1D's (``transposed=True``; entries (in, out)); x: (..., in) -> (..., out).
    ``layout`` lays out the (out, in) matrix M (S, or a Conv1D's S^T): delta = x M^T and the
    input gradient g M."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, plan: Plan, transposed: bool, layout: CsrLayout,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x, values)
        ctx.plan, ctx.transposed, ctx.layout = plan, transposed, layout
        out = layout.right(values.detach(), x2)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        need_x, need_v = ctx.needs_input_grad[:2]
        return (*_linear_delta_grads(ctx, grad_out, need_x, need_v), None, None, None)


def _linear_delta_grads(
    ctx: Any, grad_out: Tensor, need_x: bool, need_v: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(input gradient g M, values' gradient) of delta = x M^T, each None where not needed."""
    x, values = ctx.saved_tensors
    g = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_v = None
    if need_x:
        grad_x = ctx.layout.left(values, g).reshape(x.shape).to(x.dtype)
    if need_v:
        x2 = x.reshape(-1, x.shape[-1])
        grad_v = _values_grad(ctx.plan, g, x2, ctx.transposed).to(values.dtype)
    return grad_x, grad_v


class DeltaSpec(NamedTuple):
    """One active delta of a fused layer (:class:`LinearWithDeltas`): its sampled-product
    ``plan``, the CSR ``layout`` of its (out, in) matrix M and its bias entries (or None)."""

    plan: Plan
    layout: CsrLayout
    bias_indices: Tensor | None


class LinearWithDeltas(torch.autograd.Function):
    """A frozen nn.Linear or Conv1D and its active deltas as one function (the fast twin of the
    base layer plus one :class:`LinearDelta` per delta, the forward-hook route):
    y = x W0^T + b + sum_d x M_d^T (+ the deltas' bias entries); x: (..., in) -> (..., out).

    The deltas are added into the base product's output in place and the backward computes
    the input gradient g W0 + sum_d g M_d into one buffer, so the layer keeps no delta output,
    no second input-gradient buffer and no copy of a view's gradient that the separate route
    needs (one [N, out] and one [N, in] buffer and two passes less per layer). Where every
    delta's values have the output's dtype and no bias entries, each is added in turn with
    :meth:`CsrLayout.add_right_` / :meth:`CsrLayout.add_left_`; otherwise the deltas are summed
    in the values' dtype and cast once where they are added, as the separate route does.

    ``transposed``: a Conv1D (W0 stored (in, out), entries (in, out)). ``values``: each spec's
    weight values then its bias values (None where it has no bias entries). The base weight and
    bias get gradients only where they require them (dense, as nn.Linear's)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool,
        specs: tuple[DeltaSpec, ...], *values: Tensor | None,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w = weight.t() if transposed else weight  # (out, in)
        y = (torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t()))
        detached = [None if v is None else v.detach() for v in values]
        in_place = _adds_in_place(y, x2, specs, detached)
        total = None
        for spec, v, bv in zip(specs, detached[0::2], detached[1::2]):
            if in_place:
                spec.layout.add_right_(y, v, x2)
                continue
            d = spec.layout.right(v, x2)
            if bv is not None:
                d = d + torch.zeros(d.shape[1], dtype=d.dtype, device=d.device).index_add(
                    0, spec.bias_indices, bv)
            total = d if total is None else total + d
        if total is not None:
            y.add_(total.to(y.dtype))
        ctx.save_for_backward(x2, weight, *values)
        ctx.specs, ctx.transposed, ctx.in_place = specs, transposed, in_place
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, *values = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        w = weight.t() if ctx.transposed else weight  # (out, in)
        fused: dict[int, Tensor] = {}  # values' gradients taken in the fused backward pass
        if need[0]:
            grad_x = torch.mm(g.to(x2.dtype), w)
            total = None
            for i, (spec, v) in enumerate(zip(ctx.specs, values[0::2])):
                if ctx.in_place:
                    gv = (spec.layout.fused_backward(grad_x, v, g, x2) if need[5 + 2 * i]
                          else None)
                    if gv is not None:
                        fused[i] = gv
                    else:
                        spec.layout.add_left_(grad_x, v, g)
                else:
                    d = spec.layout.left(v, g)
                    total = d if total is None else total + d
            if total is not None:
                grad_x.add_(total.to(grad_x.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        elif ctx.in_place:  # no input gradient: the pass gives the values' gradients alone
            for i, (spec, v) in enumerate(zip(ctx.specs, values[0::2])):
                gv = spec.layout.fused_backward(None, v, g, x2) if need[5 + 2 * i] else None
                if gv is not None:
                    fused[i] = gv
        if need[1]:
            grad_w = torch.mm(x2.t(), g) if ctx.transposed else torch.mm(g.t(), x2)
        if need[2]:
            grad_b = g.sum(0)
        grads: list[Tensor | None] = []
        for i, (spec, v, bv) in enumerate(zip(ctx.specs, values[0::2], values[1::2])):
            gv, gb = fused.get(i), None
            if need[5 + 2 * i] and gv is None:
                gv = _values_grad(spec.plan, g, x2, ctx.transposed).to(v.dtype)
            if bv is not None and need[6 + 2 * i]:
                gb = g.to(bv.dtype).sum(0)[spec.bias_indices]
            grads += [gv, gb]
        return (grad_x, grad_w, grad_b, None, None, *grads)


def _adds_in_place(y: Tensor, x2: Tensor, specs: tuple[DeltaSpec, ...],
                   values: list[Tensor | None]) -> bool:
    """Whether :class:`LinearWithDeltas` adds each delta into the output in turn: none with
    bias entries, and every delta's values in the output's dtype or every delta's product the
    Triton kernel (:meth:`CsrLayout.kernel_adds`, which sums in float32)."""
    if any(spec.bias_indices is not None for spec in specs):
        return False
    weights = values[0::2]
    return (all(v.dtype == y.dtype for v in weights)
            or all(spec.layout.kernel_adds(y, x2, v) for spec, v in zip(specs, weights)))


def _values_grad(plan: Plan, g: Tensor, x2: Tensor, transposed: bool) -> Tensor:
    """dL/dv_j = sum_n g[n, r_j] x[n, c_j] by the plan's sampled product; g: (N, out),
    x2: (N, in) -> (k,); Conv1D entries are (in, out): the operands swap."""
    operands = (x2, g) if transposed else (g, x2)
    if operands[0].dtype != operands[1].dtype:
        dtype = torch.promote_types(operands[0].dtype, operands[1].dtype)
        operands = tuple(t.to(dtype) for t in operands)
    return plan.linear_values(*operands)


class EmbeddingDelta(torch.autograd.Function):
    """delta(ids)[n] = S[ids[n]] for an Embedding's S (entries (row = token id, dim));
    ids: (...) -> (..., dim). ``row_ptr``: (V + 1,) CSR offsets of the plan's rows."""

    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, values: Tensor, plan: Plan, row_ptr: Tensor,
        padding_idx: int | None, scale_grad_by_freq: bool,
    ) -> Tensor:
        flat = ids.reshape(-1)
        dim = plan.shape[1]
        rows, inverse = torch.unique(flat, return_inverse=True)
        starts = row_ptr[rows]
        lengths = row_ptr[rows + 1] - starts
        local = torch.repeat_interleave(torch.arange(rows.numel(), device=ids.device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        pairs = torch.arange(int(lengths.sum()), device=ids.device) + (starts - offsets)[local]
        block = torch.zeros(rows.numel(), dim, dtype=values.dtype, device=values.device)
        block[local, plan.indices[1, pairs]] = values.detach()[pairs]
        ctx.save_for_backward(flat)
        ctx.plan, ctx.padding_idx, ctx.scale = plan, padding_idx, scale_grad_by_freq
        ctx.dtype = values.dtype
        return block[inverse].view(*ids.shape, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (flat,) = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[1]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_v = ctx.plan.embedding_values(flat, g, ctx.padding_idx, ctx.scale)
            grad_v = grad_v.to(ctx.dtype)
        return None, grad_v, None, None, None, None
