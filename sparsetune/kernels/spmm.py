"""A sparse delta's product added into a dense output: out (N, a) += (M T)^T in place.

M: (a, b) with k entries in CSR (``crow`` (a + 1,), ``cols`` and ``values`` (k,)), T = x^T:
(b, N) row-major (the layer input transposed, so each entry reads a contiguous run of tokens).
This is a delta module's forward x M^T (and, over M^T's CSR order with T = g^T, its input
gradient g M) written straight into the base layer's output. Products and the add are done in
float32 (float64 for float64 operands) and rounded once to out's dtype.

:func:`spmm_add_` runs the Triton kernel (:mod:`._spmm_triton`) where
:func:`~sparsetune.kernels.kernel_available` says it can, else :func:`spmm_add_torch`, its
twin: an embedding bag over T's rows, transposed and added in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sddmm import first_launch_guarded, kernel_available

__all__ = ["spmm_add_", "spmm_add_torch"]


def spmm_add_(out: Tensor, table: Tensor, crow: Tensor, cols: Tensor, values: Tensor, *,
              backend: str = "auto") -> Tensor:
    """out += (M table)^T in place and returned; out: (N, a), table: (b, N), M: (a, b) in CSR
    (crow, cols, values) with k entries.

    ``backend``: ``"triton"``, ``"torch"`` (the twin) or ``"auto"`` (Triton where
    :func:`~sparsetune.kernels.kernel_available` for every operand's dtype, else torch).
    """
    if out.dim() != 2 or table.dim() != 2 or out.shape[0] != table.shape[1]:
        raise ValueError(f"spmm_add_: expected out (N, a) and table (b, N), got "
                         f"{tuple(out.shape)} and {tuple(table.shape)}")
    if crow.numel() != out.shape[1] + 1 or cols.shape != values.shape or cols.dim() != 1:
        raise ValueError(f"spmm_add_: expected crow ({out.shape[1] + 1},) and cols, values of "
                         f"one length (k,), got {tuple(crow.shape)}, {tuple(cols.shape)}, "
                         f"{tuple(values.shape)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"spmm_add_: backend must be 'auto', 'triton' or 'torch', got "
                         f"{backend!r}")
    auto = backend == "auto"
    if auto:
        device = out.device.type
        usable = all(kernel_available(device, t.dtype) for t in (out, table, values))
        backend = "triton" if usable and _unit_last(out) and _unit_last(table) else "torch"
    if backend == "torch":
        return spmm_add_torch(out, table, crow, cols, values)
    from ._spmm_triton import spmm_add_triton  # Triton is imported only here

    if not auto:
        return spmm_add_triton(out, table, crow, cols, values)
    return first_launch_guarded(f"spmm_add[{out.dtype},{table.dtype},{values.dtype}]",
                                out.device.type,
                                lambda: spmm_add_triton(out, table, crow, cols, values),
                                lambda: spmm_add_torch(out, table, crow, cols, values))


def _unit_last(t: Tensor) -> bool:
    return t.stride(1) == 1 or t.shape[1] == 1


def spmm_add_torch(out: Tensor, table: Tensor, crow: Tensor, cols: Tensor,
                   values: Tensor) -> Tensor:
    """The twin of the kernel: ``embedding_bag`` sums over the table's rows in float32
    (float64 if any operand is float64), added to out in that dtype and rounded once."""
    compute = (torch.float64 if torch.float64 in (out.dtype, table.dtype, values.dtype)
               else torch.float32)
    if values.numel() == 0 or out.numel() == 0:
        return out
    index = cols.to(torch.int64)
    bags = torch.nn.functional.embedding_bag(
        index, table.to(compute), crow.to(torch.int64), mode="sum",
        per_sample_weights=values.to(compute), include_last_offset=True)
    return out.copy_(out.to(compute) + bags.t())
