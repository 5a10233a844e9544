"""The sampled weight gradient: (g^T x)[r, c] = sum_n g[n, r] x[n, c] at k selected (r, c).

g: (N, out) upstream gradients, x: (N, in) layer inputs, N tokens; the k pairs (``rows``,
``cols``) in row-major order (a Linear weight's selected entries). bfloat16, float16 and float32
operands are multiplied and summed in float32 and the k values come back in float32; float64
operands (twin only) in float64.

:func:`sddmm` runs the Triton kernel (:mod:`._sddmm_triton`) where :func:`kernel_available`
says it can, else :func:`sddmm_torch`, its twin: the same products and float32 sums with torch
ops, chunk by chunk of tokens (memory bounded by :data:`CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "kernel_available", "sddmm", "sddmm_torch"]

#: Elements of the gathered float32 operands one chunk of tokens of the twin may hold (64 MiB).
CHUNK_ELEMENTS = 1 << 24

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_available(device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernel can run for tensors on ``device_type`` (and of ``dtype``):
    Triton installed, and CUDA present for ``"cuda"``, or ``TRITON_INTERPRET=1`` for
    ``"cpu"`` (the interpreter: slow, for tests)."""
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        return False
    if device_type == "cuda":
        ok = torch.cuda.is_available()
    elif device_type == "cpu":
        ok = os.environ.get("TRITON_INTERPRET") == "1"
    else:
        return False
    try:
        return ok and importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install: no kernel
        return False


def sddmm(
    g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, *, backend: str = "auto"
) -> Tensor:
    """(g^T x) at the pairs (``rows[i]``, ``cols[i]``); g: (N, out), x: (N, in), rows and cols:
    (k,) integer -> (k,) float32 (float64 for float64 operands).

    ``backend``: ``"triton"``, ``"torch"`` (the twin) or ``"auto"`` (Triton where
    :func:`kernel_available`, else torch).
    """
    if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"sddmm: expected g (N, out) and x (N, in), got {tuple(g.shape)} and "
                         f"{tuple(x.shape)}")
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"sddmm: rows and cols must be 1-D of one length, got "
                         f"{tuple(rows.shape)} and {tuple(cols.shape)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"sddmm: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        usable = kernel_available(g.device.type, g.dtype) and x.dtype == g.dtype
        backend = "triton" if usable else "torch"
    if backend == "torch":
        return sddmm_torch(g, x, rows, cols)
    from ._sddmm_triton import sddmm_triton  # Triton is imported only here

    return sddmm_triton(g, x, rows, cols)


def sddmm_torch(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The twin of the kernel: the gathered columns multiplied and summed over tokens in
    float32 (float64 for float64 operands), chunk by chunk of tokens."""
    compute = torch.float64 if g.dtype == torch.float64 else torch.float32
    k, n = rows.numel(), g.shape[0]
    out = torch.zeros(k, dtype=compute, device=g.device)
    if k == 0 or n == 0:
        return out
    step = max(1, CHUNK_ELEMENTS // (2 * k))
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    for start in range(0, n, step):
        gs = g[start:start + step].index_select(1, rows).to(compute)
        xs = x[start:start + step].index_select(1, cols).to(compute)
        out.add_((gs * xs).sum(0))
    return out
