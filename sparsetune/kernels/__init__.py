"""Triton kernels, each beside its pure-torch twin (theory: the same sums, float32 accumulation).

Triton is optional: it is imported lazily, only where a kernel can run (:func:`kernel_available`:
a CUDA tensor with Triton installed, or a CPU tensor under ``TRITON_INTERPRET=1``, which is how
the tests run every kernel), and the torch twin runs everywhere else.

* :mod:`.sddmm`: the sampled dense-dense product (g^T x)[r, c] = sum_n g[n, r] x[n, c] at k
  selected (r, c) pairs, the weight gradient of a Linear at its mask.
* :mod:`.spmm`: a sparse delta's product added into a dense output in place,
  out (N, a) += (M x^T)^T for M in CSR: the forward and input gradient of a delta module.
* :mod:`.native`: the same product on the CPU in C (compiled on first use, cached), reading x
  and writing out row-major, and its backward (input gradient and the values' sampled
  gradient in one pass): the delta modules' CPU products where a C compiler is present.
* :mod:`.table`: :class:`GatherTable`, the selected entries of many tensors gathered into one
  flat buffer (or scattered back from it) in one launch, through a table of the tensors'
  addresses; the compact optimizers' flat step reads and writes its parameters with it.
"""

from .native import (
    native_available,
    native_spmm_add_,
    native_spmm_backward_,
    native_unavailable_reason,
)
from .sddmm import kernel_available, sddmm, sddmm_torch
from .spmm import spmm_add_, spmm_add_torch
from .table import GatherTable

__all__ = ["GatherTable", "kernel_available", "native_available", "native_spmm_add_",
           "native_spmm_backward_", "native_unavailable_reason", "sddmm", "sddmm_torch",
           "spmm_add_", "spmm_add_torch"]
