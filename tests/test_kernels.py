"""sparsetune.kernels: the Triton SDDMM kernel and its torch twin, and how the plan picks it.

The kernel runs here under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) in a
subprocess, so that the variable is set before Triton builds the kernel and the rest of the test
session is left alone. References: float64 products of the same (exactly converted) operands.
The operands' products are exact in float32 (16-bit x 16-bit mantissas fit), so every dtype is
held to float32 summation rounding: relative error <= 1e-5.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsetune as st
from sparsetune import Mask
from sparsetune.kernels import kernel_available, sddmm
from sparsetune.sparse_grad import LINEAR_COSTS, LINEAR_PRODUCTS, LINEAR_SUPPORT, plan_of
from sparsetune.sparse_grad.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1e-5
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (N tokens, out, in, density, dtype): N and k off the block sizes, k = 0, a single token
SHAPES = [(37, 50, 70, 0.1, "bfloat16"), (64, 33, 20, 0.3, "float16"), (5, 16, 90, 0.05, "float32"),
          (1, 8, 8, 0.5, "bfloat16"), (70, 10, 10, 0.0, "float32")]

INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    import sparsetune as st
    from sparsetune import Mask
    from sparsetune.kernels import kernel_available, sddmm, sddmm_torch
    from sparsetune.sparse_grad import plan_of

    def rel(a, b):
        den = float(b.norm())
        return float((a.double() - b).norm()) / den if den else float((a.double() - b).norm())

    out = {"available": kernel_available("cpu", torch.bfloat16), "cases": []}
    for n, rows_, cols_, density, name in json.loads(sys.argv[1]):
        dtype = getattr(torch, name)
        gen = torch.Generator().manual_seed(n * 7 + rows_)
        g = torch.randn(n, rows_, generator=gen).to(dtype)
        x = torch.randn(n, 2 * cols_, generator=gen).to(dtype)[:, ::2]  # strided columns
        r, c = (torch.rand(rows_, cols_, generator=gen) < density).nonzero().t()
        ref = (g.double().t() @ x.double())[r, c]
        got = sddmm(g, x, r, c, backend="triton")
        twin = sddmm_torch(g, x, r, c)
        out["cases"].append({"k": r.numel(), "dtype": str(got.dtype), "err": rel(got, ref),
                             "twin": rel(twin, got.double())})
    # prepare() forced onto the kernel, and the automatic choice on CPU
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 24).bfloat16()
    bits = torch.rand(24, 40, generator=torch.Generator().manual_seed(1)) < 0.1
    mask = Mask.from_dict({"weight": bits, "bias": torch.zeros(24, dtype=torch.bool)})
    x, up = torch.randn(3, 7, 40).bfloat16(), torch.randn(3, 7, 24).bfloat16()
    with st.prepare(layer, mask, linear_product="sddmm"):
        (layer(x) * up).sum().backward()
        index = bits.view(-1).nonzero().view(-1)
        got = st.sparse_grad.selected_gradient(layer.weight, index, dtype=torch.float32)
        out["forced"] = plan_of(layer.weight).linear_product
    ref_layer = layer.double()
    ref_layer.weight.grad = None
    (ref_layer(x.double()) * up.double()).sum().backward()  # the same exact g and x
    out["prepare_err"] = rel(got, ref_layer.weight.grad[bits])
    with st.prepare(layer.bfloat16(), mask):
        out["auto_cpu"] = plan_of(layer.weight).linear_product
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    assert HAS_TRITON, "triton is a test dependency (the gpu extra): run `make install`"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(SHAPES)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_equals_the_float64_product_in_every_dtype(interpreted):
    assert interpreted["available"]
    for case, shape in zip(interpreted["cases"], SHAPES):
        assert case["dtype"] == "torch.float32", shape
        assert case["err"] <= BOUND, (shape, case)
    assert interpreted["cases"][-1]["k"] == 0


def test_kernel_and_its_torch_twin_agree(interpreted):
    for case, shape in zip(interpreted["cases"], SHAPES):
        assert case["twin"] <= BOUND, (shape, case)


def test_prepare_runs_the_kernel_when_forced_and_never_picks_it_on_cpu(interpreted):
    assert interpreted["forced"] == "sddmm"
    assert interpreted["prepare_err"] <= BOUND
    assert interpreted["auto_cpu"] in ("sampled", "blocks")  # the CPU table has no kernel price


# -- without the interpreter: the twin, the capability table, the per-device cost model -----------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_twin_equals_the_float64_product(dtype, monkeypatch):
    module = importlib.import_module("sparsetune.kernels.sddmm")
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 50)  # many chunks of tokens
    gen = torch.Generator().manual_seed(5)
    g, x = torch.randn(23, 12, generator=gen).to(dtype), torch.randn(23, 9, generator=gen).to(dtype)
    r, c = (torch.rand(12, 9, generator=gen) < 0.3).nonzero().t()
    got = sddmm(g, x, r, c)  # no kernel on CPU without the interpreter: the twin
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = (g.double().t() @ x.double())[r, c]
    assert float((got.double() - ref).norm() / ref.norm()) <= (1e-12 if got.dtype ==
                                                                 torch.float64 else BOUND)
    with pytest.raises(ValueError, match="expected g"):
        sddmm(g, x[:3], r, c)
    with pytest.raises(ValueError, match="backend"):
        sddmm(g, x, r, c, backend="cuda")


def test_kernel_is_unavailable_without_triton_or_a_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel_available("cpu")
    assert not kernel_available("cuda", torch.float64)
    assert not kernel_available("mps")
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of triton fails
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernel_available("cpu")


def test_the_capability_and_cost_tables_know_the_kernel():
    assert "sddmm" in LINEAR_PRODUCTS
    for dtype in (torch.bfloat16, torch.float16):
        assert LINEAR_SUPPORT["sddmm", "cuda", dtype] == "fp32"
    assert LINEAR_SUPPORT["sddmm", "cuda", torch.float32] == "native"
    assert set(LINEAR_COSTS) >= {"cpu", "cuda"}
    assert "sddmm_mac" in LINEAR_COSTS["cuda"] and "sddmm_mac" not in LINEAR_COSTS["cpu"]


def test_the_cuda_cost_table_picks_the_kernel_at_low_density_only(monkeypatch):
    """Where the kernel can run, auto takes it for a very sparse weight and the dense product
    for a denser one; without the kernel, never; the CPU choice is unchanged."""
    from sparsetune.sparse_grad import plan as plan_module

    gen = torch.Generator().manual_seed(6)
    sparse = torch.rand(2048, 2048, generator=gen) < 1e-4
    dense = torch.rand(2048, 2048, generator=gen) < 0.05
    monkeypatch.setattr(plan_module, "kernel_available", lambda device_type, dtype=None: False)
    assert Plan("w", sparse, torch.device("cpu")).product_for("cuda", torch.bfloat16) != "sddmm"
    monkeypatch.setattr(plan_module, "kernel_available", lambda device_type, dtype=None: True)
    assert Plan("w", sparse, torch.device("cpu")).product_for("cuda", torch.bfloat16) == "sddmm"
    assert Plan("w", dense, torch.device("cpu")).product_for("cuda", torch.bfloat16) == "blocks"
    assert Plan("w", sparse, torch.device("cpu")).product_for("cpu", torch.bfloat16) != "sddmm"
    prices = Plan("w", sparse, torch.device("cpu")).linear_prices("cuda")
    assert set(prices) == {"sampled", "blocks", "sddmm"}


def test_forced_kernel_without_triton_runs_the_twin_exactly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9).double()
    bits = torch.rand(9, 12, generator=torch.Generator().manual_seed(8)) < 0.3
    mask = Mask.from_dict({"weight": bits, "bias": torch.ones(9, dtype=torch.bool)})
    x = torch.randn(4, 12, dtype=torch.float64)
    ref = torch.nn.Linear(12, 9).double()
    ref.load_state_dict(layer.state_dict())
    ref(x).pow(2).sum().backward()
    with st.prepare(layer, mask, linear_product="sddmm"):
        layer(x).pow(2).sum().backward()
        assert plan_of(layer.weight).linear_product == "sddmm"
        got = st.sparse_grad.selected_gradient(layer.weight, bits.view(-1).nonzero().view(-1))
    torch.testing.assert_close(got, ref.weight.grad[bits], rtol=0, atol=1e-12)
