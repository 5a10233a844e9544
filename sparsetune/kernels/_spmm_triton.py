"""The Triton kernel of :func:`~sparsetune.kernels.spmm_add_` (imported only where it can run).

out (N, a) += (M T)^T for M: (a, b) in CSR (crow, cols, vals) and the table T = x^T: (b, N)
row-major. One program takes ``BLOCK_R`` consecutive rows of M and ``BLOCK_N`` tokens: it walks
the rows' entries in step (up to the longest row of the block, computed by the launcher;
shorter rows masked), loads for
each entry j the contiguous run T[c_j, n0:n0 + BLOCK_N] (a coalesced load, as an embedding
bag's), and sums v_j T[c_j, n] in float32 registers; at the end it reads the (BLOCK_N, BLOCK_R)
tile of ``out``, adds the sums in float32 and writes it back rounded once to out's dtype (no
transposed copy of the result, no separate add). Offsets are 64-bit.

The kernel calls only Triton builtins, none of ``triton.language``'s own jit functions
(``tl.max``, ``tl.zeros``): the interpreter cannot run those once Triton has been imported for
compiling in the same process, and the tests run this kernel in-process under it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK_N", "BLOCK_R", "spmm_add_triton"]

BLOCK_R = 32
BLOCK_N = 64


@triton.jit
def _spmm_add_kernel(
    out_ptr, table_ptr, crow_ptr, cols_ptr, vals_ptr, longest_ptr, n_tokens, n_rows,
    stride_out, stride_table, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = offs_r < n_rows
    start = tl.load(crow_ptr + offs_r, mask=in_r, other=0).to(tl.int64)
    length = tl.load(crow_ptr + offs_r + 1, mask=in_r, other=0).to(tl.int64) - start
    longest = tl.load(longest_ptr + tl.program_id(0))
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_n = offs_n < n_tokens
    acc = tl.full((BLOCK_R, BLOCK_N), 0.0, tl.float32)
    for t in range(0, longest):
        has = in_r & (t < length)
        c = tl.load(cols_ptr + start + t, mask=has, other=0).to(tl.int64)
        v = tl.load(vals_ptr + start + t, mask=has, other=0.0).to(tl.float32)
        xv = tl.load(table_ptr + c[:, None] * stride_table + offs_n[None, :],
                     mask=has[:, None] & in_n[None, :], other=0.0)
        acc += v[:, None] * xv.to(tl.float32)
    both = in_r[:, None] & in_n[None, :]
    ptrs = out_ptr + offs_n[None, :] * stride_out + offs_r[:, None].to(tl.int64)
    y = tl.load(ptrs, mask=both, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=both)


def _unit_last(t: Tensor) -> bool:
    """Unit stride along the last dimension (any stride where it has one element)."""
    return t.stride(1) == 1 or t.shape[1] == 1


def spmm_add_triton(out: Tensor, table: Tensor, crow: Tensor, cols: Tensor,
                    values: Tensor) -> Tensor:
    """Launch the kernel: out (N, a) with unit column stride, table (b, N) row-major, crow
    (a + 1,), cols and values (k,); bf16, fp16 or fp32 operands. Returns ``out``."""
    for name, t in (("out", out), ("table", table), ("values", values)):
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"spmm kernel: {name} must be bfloat16, float16 or float32, got "
                             f"{t.dtype}")
    if not (_unit_last(out) and _unit_last(table)):
        raise ValueError("spmm kernel: out and table must have unit stride along their last "
                         "dimension")
    n_tokens, n_rows = out.shape
    if n_tokens == 0 or n_rows == 0 or values.numel() == 0:
        return out
    blocks = triton.cdiv(n_rows, BLOCK_R)
    lengths = torch.zeros(blocks * BLOCK_R, dtype=torch.int64, device=out.device)
    lengths[:n_rows] = crow[1:] - crow[:-1]
    longest = lengths.view(blocks, BLOCK_R).amax(1)  # each block's longest row
    grid = (blocks, triton.cdiv(n_tokens, BLOCK_N))
    _spmm_add_kernel[grid](out, table, crow.contiguous(), cols.contiguous(),
                           values.contiguous(), longest, n_tokens, n_rows, out.stride(0),
                           table.stride(0), BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
    return out
