"""CsrLayout's sparse products (the delta modules' forward and input gradient) against the
dense matrix they stand for, in float64, with rows and columns in any order, empty rows and
columns, and duplicates refused by construction (a mask selects an entry once)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from sparsetune.modules import CsrLayout


@settings(max_examples=40)
@given(a=st_.integers(1, 9), b=st_.integers(1, 9), n=st_.integers(1, 5),
       density=st_.floats(0.0, 1.0), seed=st_.integers(0, 2**16))
def test_right_and_left_equal_the_dense_products(a, b, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.nonzero(torch.rand(a * b, generator=g) < density).flatten()
    flat = flat[torch.randperm(flat.numel(), generator=g)]  # any order, as a Conv1D's flip
    rows, cols = flat // b, flat % b
    values = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
    dense_m = torch.zeros(a, b, dtype=torch.float64)
    dense_m[rows, cols] = values
    layout = CsrLayout(rows, cols, (a, b))
    x = torch.randn(n, b, generator=g, dtype=torch.float64)
    y = torch.randn(n, a, generator=g, dtype=torch.float64)
    right, left = layout.right(values, x), layout.left(values, y)
    torch.testing.assert_close(right, x @ dense_m.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(left, y @ dense_m, rtol=1e-12, atol=1e-12)
    assert right.is_contiguous() and left.is_contiguous()
    # 16-bit inputs are computed in the values' dtype
    r16 = layout.right(values.float(), x.to(torch.bfloat16))
    assert r16.dtype == torch.float32
