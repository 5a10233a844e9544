"""The Triton kernel of :func:`~sparsetune.kernels.sddmm` (imported only where it can run).

One program takes ``BLOCK_K`` consecutive selected pairs: in row-major order they fall in a
narrow band of rows (a row block), so within one chunk of ``BLOCK_N`` tokens the band's
gradient columns are loaded once for all its pairs (neighbours share a row: the same address).
The program walks every token once, chunk by chunk, loads the (BLOCK_N, BLOCK_K) tiles of
g[n, r] and x[n, c] in the operands' dtype, and sums their products in float32 registers; the
k values are written once, in float32. Offsets are 64-bit: N x width may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK_K", "BLOCK_N", "sddmm_triton"]

BLOCK_K = 64
BLOCK_N = 32


@triton.jit
def _sddmm_kernel(
    g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, n_tokens, k, stride_g, stride_x,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < k
    r = tl.load(rows_ptr + offs_k, mask=in_k, other=0).to(tl.int64)
    c = tl.load(cols_ptr + offs_k, mask=in_k, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        both = (offs_n < n_tokens)[:, None] & in_k[None, :]
        gv = tl.load(g_ptr + offs_n[:, None] * stride_g + r[None, :], mask=both, other=0.0)
        xv = tl.load(x_ptr + offs_n[:, None] * stride_x + c[None, :], mask=both, other=0.0)
        acc += tl.sum(gv.to(tl.float32) * xv.to(tl.float32), axis=0)
    tl.store(out_ptr + offs_k, acc, mask=in_k)


def sddmm_triton(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Launch the kernel: g (N, out), x (N, in) of one dtype (bf16, fp16, fp32), rows and
    cols (k,) -> (k,) float32."""
    if g.dtype != x.dtype or g.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"sddmm kernel: operands must share a dtype among bfloat16, float16 "
                         f"and float32, got {g.dtype} and {x.dtype}")
    if g.stride(1) != 1:
        g = g.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = rows.contiguous(), cols.contiguous()
    k, n = rows.numel(), g.shape[0]
    out = torch.empty(k, dtype=torch.float32, device=g.device)
    if k == 0:
        return out
    grid = (triton.cdiv(k, BLOCK_K),)
    _sddmm_kernel[grid](g, x, rows, cols, out, n, k, g.stride(0), x.stride(0),
                        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
