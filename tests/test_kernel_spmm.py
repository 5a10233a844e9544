"""sparsetune.kernels.spmm_add_: a delta's product added into a dense output in place,
out (N, a) += (M x^T)^T, the Triton kernel against float64 dense references and its torch twin,
and the fused delta layer taking it.

The kernel runs here under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors), set by
conftest's ``interpreter`` fixture, which also sets aside any compiled build of the kernel
module (Triton picks the interpreter when the ``@triton.jit`` functions are defined, at import)
and restores it after.
The kernel sums in float32 and rounds once into out; the bound for 16-bit outputs is one unit
in the last place of the result plus the float32 sums' error.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from sparse_helpers import random_csr
from torch import nn

import sparsetune as st
from sparsetune.kernels import spmm_add_, spmm_add_torch
from sparsetune.modules import functions

KERNEL = "sparsetune.kernels._spmm_triton"

# (N tokens, a rows of M, b columns, density, out dtype, values dtype): N and a off the block
# sizes, k = 0, a single token, empty rows, more tokens than one block
CASES = [(37, 50, 70, 0.1, torch.bfloat16, torch.float32),
         (64, 33, 20, 0.3, torch.float16, torch.float16),
         (5, 16, 90, 0.05, torch.float32, torch.float32),
         (1, 8, 8, 0.5, torch.bfloat16, torch.float32),
         (70, 10, 10, 0.0, torch.float32, torch.float32),
         (130, 40, 3, 0.9, torch.float32, torch.float32)]


def _problem(n, a, b, density, out_dtype, values_dtype, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed + n * 7 + a)
    dense, crow, cols, values = random_csr(a, b, density, values_dtype, g, index_dtype)
    x = torch.randn(n, b, generator=g, dtype=torch.float64).to(out_dtype)
    # row strides beyond the width: out and the table are slices of wider buffers
    out = torch.randn(n, a + 3, generator=g, dtype=torch.float64).to(out_dtype)[:, :a]
    table = torch.zeros(b, n + 5, dtype=out_dtype)[:, :n]
    table.copy_(x.t())
    exact = out.double() + x.double() @ dense.t()
    return out, table, crow, cols, values, exact


def _bound(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    ulp = torch.finfo(dtype).eps
    return ulp * exact.abs() + 1e-5 * (1 + exact.abs())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[4]}")
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_kernel_adds_the_product_in_place(interpreter, case, index_dtype):
    out, table, crow, cols, values, exact = _problem(*case, index_dtype=index_dtype)
    twin = spmm_add_torch(out.clone(), table, crow, cols, values)
    got = out.clone()
    assert spmm_add_(got, table, crow, cols, values, backend="triton") is got
    assert got.dtype == out.dtype
    assert ((got.double() - exact).abs() <= _bound(exact, out.dtype)).all()
    assert ((twin.double() - exact).abs() <= _bound(exact, out.dtype)).all()
    auto = out.clone()
    spmm_add_(auto, table, crow, cols, values)  # "auto" takes the kernel here
    assert torch.equal(auto, got)


@settings(max_examples=30, deadline=None)
@given(n=hs.integers(0, 9), a=hs.integers(1, 9), b=hs.integers(1, 9),
       density=hs.floats(0.0, 1.0), seed=hs.integers(0, 2**16))
def test_twin_is_the_dense_product_in_float64(n, a, b, density, seed):
    out, table, crow, cols, values, exact = _problem(n, a, b, density, torch.float64,
                                                     torch.float64, seed)
    got = spmm_add_(out, table, crow, cols, values)  # no interpreter: the twin
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)


def test_bad_operands_are_named():
    out, table, crow, cols, values, _ = _problem(4, 5, 6, 0.5, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="table"):
        spmm_add_(out, table[:, :3], crow, cols, values)
    with pytest.raises(ValueError, match="crow"):
        spmm_add_(out, table, crow[:-1], cols, values)
    with pytest.raises(ValueError, match="backend"):
        spmm_add_(out, table, crow, cols, values, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_layer_takes_the_kernel_and_equals_the_twin(interpreter, monkeypatch, dtype):
    """A bf16 (fp32) Linear with two deltas under the interpreter: the fused layer adds each
    delta with the kernel (forward and input gradient) and equals the hook route."""
    from sparsetune.modules import slot

    launches = []
    kernel_module = importlib.import_module(KERNEL)
    original = kernel_module.spmm_add_triton
    monkeypatch.setattr(kernel_module, "spmm_add_triton",
                        lambda *a: launches.append(1) or original(*a))
    monkeypatch.setattr(functions, "CSR_PER_LINE", 0.0)  # fp32 on the CPU: not a CSR row
    monkeypatch.setattr(functions, "NATIVE", False)  # product (MKL's or the C kernel)

    def run(fuse: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).to(dtype)
        g = torch.Generator().manual_seed(1)
        for name in ("a", "b"):
            bits = {n: (torch.rand(p.shape, generator=g) < 0.3) & (p.dim() == 2)
                    for n, p in model.named_parameters()}
            handle = st.attach(model, st.Mask.from_dict(bits), name=name)
            with torch.no_grad():
                for p in handle.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(3, 5, 12, generator=g).to(dtype).requires_grad_()
        monkeypatch.setattr(slot.DeltaSlot, "fuse", fuse)
        out = model(x)
        out.float().square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), x.grad, grads

    out, gx, grads = run(fuse=True)
    assert len(launches) == 2 * 2 * 2  # 2 layers x 2 deltas, forward and input gradient
    launches.clear()
    ref_out, ref_gx, ref_grads = run(fuse=False)
    assert launches == []  # the hook route never takes the kernel
    def close(a, b):  # the routes round differently: a few units of the largest term
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=8 * eps * float(b.abs().max()))

    close(out, ref_out)
    close(gx, ref_gx)
    assert grads.keys() == ref_grads.keys() and len(grads) == 4
    for name in grads:
        close(grads[name], ref_grads[name])
