"""The products that compute a Linear's weight gradient at its k selected entries, in every
dtype, which of them can run where (:data:`LINEAR_SUPPORT`), and what each costs
(:data:`LINEAR_COSTS`).

The gradient is (g^T x)[r, c] = sum_n g[n, r] x[n, c] over the N tokens of the batch. In
float32 and float64 both products compute in the dtype itself. In bfloat16 and float16 they
compute in float32: ``torch.sparse.sampled_addmm`` has no kernel for these dtypes (CPU or
CUDA), and a 16-bit dense product rounds its result (on CUDA, by default, also its partial
sums) to 16 bits. The operands are cast to float32 chunk by chunk of tokens, so the extra
memory is bounded (:data:`CHUNK_ELEMENTS`), and the k values come back in float32. The
Triton kernel (``"sddmm"``, :mod:`sparsetune.kernels`) reads the operands in their own dtype
and sums in float32 registers: no copies at all.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor

from ..kernels import sddmm

__all__ = [
    "CHUNK_ELEMENTS", "LINEAR_COSTS", "LINEAR_PRODUCTS", "LINEAR_SUPPORT", "block_values",
    "csr_template", "kernel_values", "linear_costs", "linear_support", "release_workspace",
    "sampled_values",
]

#: How the weight gradient of a Linear is computed at its k selected entries (``prepare``'s
#: ``linear_product``): ``"sampled"`` takes k dot products over the batch
#: (``torch.sparse.sampled_addmm``, which needs both operands copied into a transposed layout);
#: ``"blocks"`` gathers the R rows and C columns the mask touches and takes one dense R x C
#: product (BLAS, no transposed copies), then reads the k entries from it (R = out, C = in is
#: the plain dense product); ``"sddmm"`` is the Triton kernel of
#: :func:`sparsetune.kernels.sddmm` (k dot products read straight from the operands, float32
#: sums; CUDA with Triton installed; forced where the kernel cannot run, its torch twin runs,
#: exact but slow); ``"auto"`` picks the cheapest per weight by the cost
#: table of the device type (:data:`LINEAR_COSTS`) among those :data:`LINEAR_SUPPORT` says can
#: run for the device and dtype at hand.
LINEAR_PRODUCTS = ("auto", "sampled", "blocks", "sddmm")

#: Cost per token of the operations above, in ns, one table per device type (only ratios
#: within a table matter; a device type without a table uses the CPU's): a multiply-add inside
#: a dense matrix product (``mac``), one inside the sampled product (``sampled_mac``), an
#: element of a transposed copy (``transpose``, memory bound), an element gathered along a row
#: (``gather``, also the price of casting one element to float32) and a pair-token of the
#: Triton kernel (``sddmm_mac``: two gathered loads, one float32 multiply-add). A product whose
#: constant a table lacks is never chosen automatically on that device type.
#:
#: ``"cpu"``: from microbenchmarks at MiniLM's shapes on a 2-core x86 VM with torch's CPU
#: build (672 tokens, 384 x 384 and 1536 x 384 weights, inside a training step where copies run
#: slower than alone). A dense product runs some 10 times faster per multiply-add than the
#: sampled one and 100 times faster than a transposed copy per element, so the sampled product
#: wins only on wide layers at low density. The kernel runs on CPU only under the Triton
#: interpreter (tests), so the CPU table has no ``sddmm_mac``.
#:
#: ``"cuda"``: GUESSES, not yet measured (benchmarks/gpu.py is the place to measure them): a
#: tensor-core multiply-add at ~100 T/s sustained (0.00001 ns), gathers, copies and cuSPARSE's
#: sampled multiply-adds bound by ~2 TB/s of scattered 2-4 byte reads (0.002 ns), the kernel's
#: pair-token two such reads mostly from L2 (0.004 ns). With these, the dense product wins
#: above a density of ~0.25% and the kernel below it.
LINEAR_COSTS: dict[str, dict[str, float]] = {
    "cpu": {"mac": 0.0055, "sampled_mac": 0.055, "transpose": 0.8, "gather": 0.4},
    "cuda": {"mac": 0.00001, "sampled_mac": 0.002, "transpose": 0.002, "gather": 0.002,
             "sddmm_mac": 0.004},
}

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.bfloat16, torch.float16)

#: (product, device type, dtype of the gradient) -> how the product computes there:
#: ``"native"`` in the dtype itself, ``"fp32"`` with the operands cast to float32 chunk by chunk
#: (float32 accumulation, float32 values). A combination missing here cannot run, and
#: :func:`linear_support` says so; the automatic choice only picks one that can. The blocks
#: product is a plain dense product, so it also runs on device types not listed (see
#: :func:`linear_support`); ``sampled_addmm`` exists only for CPU and CUDA. ``"sddmm"`` reads
#: 16-bit operands as they are and sums in float32; the automatic choice takes it only where
#: :func:`sparsetune.kernels.kernel_available` (CUDA with Triton; CPU under
#: ``TRITON_INTERPRET=1``, for tests), and float64 always runs the twin.
LINEAR_SUPPORT: dict[tuple[str, str, torch.dtype], str] = {
    **{
        (product, device_type, dtype): "native" if dtype in _FLOATS else "fp32"
        for product in ("sampled", "blocks")
        for device_type in ("cpu", "cuda")
        for dtype in _FLOATS + _HALVES
    },
    **{
        ("sddmm", device_type, dtype): "native" if dtype in _FLOATS else "fp32"
        for device_type in ("cpu", "cuda")
        for dtype in _FLOATS + _HALVES
    },
}


def linear_costs(device_type: str) -> dict[str, float]:
    """The cost table of ``device_type`` (:data:`LINEAR_COSTS`; the CPU's for unknown types)."""
    return LINEAR_COSTS.get(device_type, LINEAR_COSTS["cpu"])


#: Elements of float32 operand copies one chunk of tokens may hold (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def linear_support(product: str, device_type: str, dtype: torch.dtype) -> str | None:
    """How ``product`` computes a weight gradient of ``dtype`` on ``device_type``: ``"native"``,
    ``"fp32"`` (cast to float32 chunk by chunk), or None where it cannot run."""
    how = LINEAR_SUPPORT.get((product, device_type, dtype))
    if how is None and product == "blocks" and dtype.is_floating_point:
        how = "native" if dtype in _FLOATS else "fp32"  # any device with a dense matmul
    return how


def block_values(
    g: Tensor, x: Tensor, rows: Tensor | None, cols: Tensor | None, local: Tensor, how: str
) -> Tensor:
    """(g^T x) restricted to ``rows`` x ``cols`` (None: all), read at the flat ``local``
    indices; g: (N, out), x: (N, in) -> (k,), in float32 where ``how`` is ``"fp32"``."""
    g = g if rows is None else g.index_select(1, rows)
    x = x if cols is None else x.index_select(1, cols)
    if how == "native":
        return (g.t() @ x).view(-1).index_select(0, local)
    n, width = g.shape[0], g.shape[1] + x.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    product = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float32, device=g.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        product.addmm_(g[start:stop].float().t(), x[start:stop].float())
    return product.view(-1).index_select(0, local)


def kernel_values(g: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """(g^T x) at the (2, k) ``indices`` by the Triton kernel where it can run, else its torch
    twin (float32 values; float64 for float64 operands); g: (N, out), x: (N, in)."""
    return sddmm(g, x, indices[0], indices[1])


def sampled_values(template: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """(g^T x) at the nonzeros of the CSR ``template`` (its dtype: the compute dtype, float32
    for 16-bit operands, which are cast as they are copied); g: (N, out), x: (N, in) -> (k,)."""
    dtype, n = template.dtype, g.shape[0]
    step = max(1, CHUNK_ELEMENTS // (g.shape[1] + x.shape[1]))
    if n <= step:
        # sampled_addmm reads mat1 row-major and mat2 column-major: give it both as copies in
        # that layout (x^T is shared by the query, key and value projections of one input).
        gt, xt = _transpose_into(g, "grad", dtype), _transposed(x, dtype)
        return torch.sparse.sampled_addmm(template, gt, xt.t(), beta=0.0).values()
    if hasattr(_WORKSPACE, "last_input"):
        del _WORKSPACE.last_input  # the "input" slot is overwritten below
    values = None
    for start in range(0, n, step):
        gt = _transpose_into(g[start:start + step], "grad", dtype)
        xt = _transpose_into(x[start:start + step], "input", dtype)
        part = torch.sparse.sampled_addmm(template, gt, xt.t(), beta=0.0).values()
        values = part.clone() if values is None else values.add_(part)
    return values


def csr_template(indices: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A CSR matrix with zeros at the (2, k) row-major sorted ``indices``."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.cumsum(torch.bincount(indices[0], minlength=shape[0]), 0)
    values = torch.zeros(indices.shape[1], dtype=dtype, device=indices.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, fine
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, indices[1], values, shape, check_invariants=False)


# Per-thread scratch buffers for the transposed operands of the sampled products. Reusing them
# avoids a fresh multi-megabyte allocation per layer, which on CPU costs as much as the copy
# (the pages are mapped and zeroed by the kernel on first touch).
_WORKSPACE = threading.local()


def _transpose_into(x: Tensor, slot: str, dtype: torch.dtype) -> Tensor:
    """``x.t().contiguous().to(dtype)`` written into this thread's scratch buffer ``slot``."""
    n, c = x.shape
    buf = getattr(_WORKSPACE, slot, None)
    if buf is None or buf.numel() < x.numel() or buf.dtype != dtype or buf.device != x.device:
        buf = torch.empty(x.numel(), dtype=dtype, device=x.device)
        setattr(_WORKSPACE, slot, buf)
    return buf[: x.numel()].view(c, n).copy_(x.t())


def _transposed(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.t().contiguous().to(dtype)``, reused when the same unchanged tensor is asked for
    again. The query, key and value projections of one input share it. The result lives in the
    thread's ``"input"`` scratch buffer until a different tensor is transposed.
    """
    key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.dtype,
           x.device, x._version, dtype)
    last = getattr(_WORKSPACE, "last_input", None)
    if last is not None and last[0] == key:
        return last[2]
    xt = _transpose_into(x, "input", dtype)
    _WORKSPACE.last_input = (key, x, xt)  # holding x keeps its storage from being reused
    return xt


def release_workspace() -> None:
    """Free this thread's scratch buffers (when sparse-gradient mode ends)."""
    for slot in ("grad", "input", "last_input"):
        if hasattr(_WORKSPACE, slot):
            delattr(_WORKSPACE, slot)
