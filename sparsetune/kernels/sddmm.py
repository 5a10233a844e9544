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
import warnings
from collections.abc import Callable
from typing import Any

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


_LAUNCHED: dict[tuple[str, str], bool] = {}  # (kernel, device type) -> its first launch built


def first_launch_guarded(name: str, device_type: str, launch: Callable[[], Any],
                         twin: Callable[[], Any]) -> Any:
    """``launch()``, the Triton kernel ``name`` (with its dtypes: one compiled variant) chosen
    by ``backend="auto"``; if its very first launch on ``device_type`` raises (Triton cannot
    build it for this GPU or release: compile errors come before any write), one
    RuntimeWarning naming the error and ``twin()``, the torch twin, from then on for this
    variant and device type. Later errors propagate."""
    key = (name, device_type)
    built = _LAUNCHED.get(key)
    if built is False:
        return twin()
    if built:
        return launch()
    try:
        result = launch()
    except Exception as exc:  # reported, never silent: the twin computes the same sums
        _LAUNCHED[key] = False
        warnings.warn(f"sparsetune: the Triton kernel {name} failed at its first launch on "
                      f"{device_type} ({type(exc).__name__}: {str(exc)[:300]}); its torch twin "
                      f"runs instead from now on", RuntimeWarning, stacklevel=3)
        return twin()
    _LAUNCHED[key] = True
    return result


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
    auto = backend == "auto"
    if auto:
        usable = kernel_available(g.device.type, g.dtype) and x.dtype == g.dtype
        backend = "triton" if usable else "torch"
    if backend == "torch":
        return sddmm_torch(g, x, rows, cols)
    from ._sddmm_triton import sddmm_triton  # Triton is imported only here

    if not auto:
        return sddmm_triton(g, x, rows, cols)
    return first_launch_guarded(f"sddmm[{g.dtype}]", g.device.type,
                                lambda: sddmm_triton(g, x, rows, cols),
                                lambda: sddmm_torch(g, x, rows, cols))


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
