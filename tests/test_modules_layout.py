"""CsrLayout's sparse products (the delta modules' forward and input gradient) against the
dense matrix they stand for, in float64, with rows and columns in any order, empty rows and
columns, and duplicates refused by construction (a mask selects an entry once)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from sparsetune.kernels import native_available
from sparsetune.modules import CsrLayout, functions


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
    # every product, whichever is taken: the C kernel and MKL's CSR product (fp32/fp64 on the
    # CPU) and the embedding-bag sums (everywhere; bf16 and CUDA values)
    v = values if layout.perm is None else values[layout.perm]
    vt = v[layout.perm_t]
    products = [lambda c, r, w, s_, d: functions._bags(c, r, w, d.t().contiguous()),
                lambda c, r, w, s_, d: functions._csr_mm(r, c, w, s_, d)]
    if native_available():  # (test_kernel_native asserts it wherever a compiler is)
        products.append(lambda c, r, w, s_, d: functions._csr_mm(r, c, w, s_, d, native=True))
    for product in products:
        torch.testing.assert_close(product(layout.col, layout.crow, v, (a, b), x), right,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(product(layout.col_t, layout.crow_t, vt, (b, a), y), left,
                                   rtol=1e-12, atol=1e-12)
    per_line = values.numel() / (a + b)  # the C kernel where it compiles (test_kernel_native)
    native = functions._native_ok()
    limit = functions.NATIVE_PER_LINE if native else functions.CSR_PER_LINE
    expected = None if per_line > limit else "native" if native else "mkl"
    assert layout.cpu_route(values) == expected
    assert layout.uses_csr(values) == (expected is not None)
    assert layout.cpu_route(values.bfloat16()) is None
    assert functions._csr_mm_ok(values) and not functions._csr_mm_ok(values.bfloat16())
    # 16-bit inputs are computed in the values' dtype
    r16 = layout.right(values.float(), x.to(torch.bfloat16))
    assert r16.dtype == torch.float32
    # in place into a row-major output (what the attached Linear's output gets on CPU)
    original = functions.CSR_PER_LINE, functions.NATIVE
    try:
        for dtype, (per_line, native) in [(d, r) for d in (torch.float64, torch.float32)
                                          for r in ((0, False), (1e9, False), (1e9, True))]:
            # every branch of the in-place add: bags, MKL's CSR product, the C kernel
            functions.CSR_PER_LINE, functions.NATIVE = per_line, native
            route = layout.cpu_route(values)
            bags = per_line == 0 and values.numel() > 0  # (k = 0 is within any limit)
            assert route == (None if bags else "native" if functions._native_ok() else "mkl")
            base = torch.randn(n, a, generator=g, dtype=torch.float64).to(dtype)
            out = base.clone()
            tol = {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
            assert layout.add_right_(out, values.to(dtype), x.to(dtype)) is out
            torch.testing.assert_close(out, base + x.to(dtype) @ dense_m.t().to(dtype), **tol)
            assert out.is_contiguous()
            # and the input gradient's: out += y M, into a row-major (n, b)
            base = torch.randn(n, b, generator=g, dtype=torch.float64).to(dtype)
            out = base.clone()
            assert layout.add_left_(out, values.to(dtype), y.to(dtype)) is out
            torch.testing.assert_close(out, base + y.to(dtype) @ dense_m.to(dtype), **tol)
            assert out.is_contiguous()
    finally:
        functions.CSR_PER_LINE, functions.NATIVE = original
