"""The Triton kernels of :class:`~sparsetune.kernels.GatherTable` (imported only where they run).

One launch covers every tensor of the table. Program ``b`` reads row ``b`` of the block table
(5 int64 columns: tensor, out start, out end, base, all; see :mod:`.table`) and moves the entries
out[start:end] of one tensor: its address is read from the pointer table (int64, one
``data_ptr()`` per tensor) and cast to a pointer of the tensors' element type (that of the
``like`` argument: a tensor of that dtype). The local flat indices are ``base + i`` for a
tensor whose entries are all taken (no index is loaded) and ``index[base + i]`` otherwise.
Offsets are 64-bit; values are cast to the destination's dtype in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gather_triton", "scatter_triton"]


@triton.jit
def _locate(blocks_ptr, ptrs_ptr, index_ptr, like_ptr, BLOCK: tl.constexpr):
    """This program's entries: their positions in the flat buffer, the live lanes, and the
    addresses of the entries in their tensor."""
    row = blocks_ptr + tl.program_id(0).to(tl.int64) * 5
    tensor = tl.load(row)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    base = tl.load(row + 3)
    every = tl.load(row + 4)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    flat = start + offs
    live = flat < end
    # an every-entry block loads no index: its lanes are masked off (listed_end = start)
    listed_end = start + (end - start) * (1 - every)
    listed = tl.load(index_ptr + base + offs, mask=flat < listed_end, other=0).to(tl.int64)
    local = listed + (base + offs) * every  # listed is 0 where every == 1
    origin = tl.load(ptrs_ptr + tensor).to(like_ptr.dtype)  # int64 address -> typed pointer
    return flat, live, origin + local


@triton.jit
def _gather_kernel(blocks_ptr, ptrs_ptr, index_ptr, like_ptr, out_ptr, BLOCK: tl.constexpr):
    flat, live, src = _locate(blocks_ptr, ptrs_ptr, index_ptr, like_ptr, BLOCK)
    values = tl.load(src, mask=live)
    tl.store(out_ptr + flat, values.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _scatter_kernel(blocks_ptr, ptrs_ptr, index_ptr, like_ptr, values_ptr, BLOCK: tl.constexpr):
    flat, live, dst = _locate(blocks_ptr, ptrs_ptr, index_ptr, like_ptr, BLOCK)
    values = tl.load(values_ptr + flat, mask=live)
    tl.store(dst, values.to(like_ptr.dtype.element_ty), mask=live)


def gather_triton(
    blocks: Tensor, ptrs: Tensor, index: Tensor, like: Tensor, out: Tensor, block: int
) -> None:
    """One launch: out[j] = tensors[t(j)].view(-1)[idx(j)]; blocks (B, 5) int64 rows of at most
    ``block`` entries, ptrs (T,) int64 device addresses of the tensors (all of ``like``'s
    dtype), index (>= 1,) int32/int64, out (k,) contiguous."""
    if blocks.shape[0]:
        _gather_kernel[(blocks.shape[0],)](blocks, ptrs, index, like, out, BLOCK=block)


def scatter_triton(
    blocks: Tensor, ptrs: Tensor, index: Tensor, like: Tensor, values: Tensor, block: int
) -> None:
    """One launch: tensors[t(j)].view(-1)[idx(j)] = values[j], cast to ``like``'s dtype;
    arguments as in :func:`gather_triton`."""
    if blocks.shape[0]:
        _scatter_kernel[(blocks.shape[0],)](blocks, ptrs, index, like, values, BLOCK=block)
