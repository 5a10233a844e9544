"""A random sparse matrix for the sparse-product kernel tests, in CSR and as a float64 dense
reference of the values as stored."""

from __future__ import annotations

import warnings

import torch


def random_csr(a: int, b: int, density: float, dtype: torch.dtype, generator: torch.Generator,
               index_dtype: torch.dtype = torch.int64):
    """(dense, crow, cols, values): an (a, b) matrix with entries at a ``density`` fraction of
    places, its values rounded to ``dtype``; ``dense`` is float64, the CSR arrays in
    ``index_dtype`` and the values in ``dtype``."""
    dense = (torch.rand(a, b, generator=generator) < density).double() * torch.randn(
        a, b, generator=generator, dtype=torch.float64)
    dense = dense.to(dtype).double()  # the values as stored
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = dense.to_sparse_csr()
    crow, cols = csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype)
    return dense, crow, cols, csr.values().to(dtype)
