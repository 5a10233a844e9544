"""The fused layer (LinearWithDeltas: base product and deltas as one function, the instance
forward of a plain nn.Linear or Conv1D) against its slow twin (the class's own forward, then
LinearDelta per delta in the forward hook's sum), on every device of the ``device`` fixture:
outputs, input gradients, values' and base gradients, for 2-D and 3-D inputs, one or two
deltas, bias entries, unfrozen base weights, both CPU products (CSR and bags), and every float
dtype; plus the fallbacks (autocast, a quantized weight) and the forward's removal."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparsetune as st
from sparsetune.kernels import native_available
from sparsetune.modules import SLOT, functions, slot

CASES = list(itertools.product(
    [torch.float64, torch.float32, torch.bfloat16],  # base dtype
    ["linear", "conv1d"],
    [2, 3],  # input rank
    [False, True],  # a second active delta
    [False, True],  # bias entries in the deltas
))


def _model(kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layer = (lambda i, o: nn.Linear(i, o)) if kind == "linear" else (lambda i, o: Conv1D(o, i))
    return nn.Sequential(layer(7, 9), nn.Tanh(), layer(9, 5)).to(device, dtype)


def _run(kind, dtype, rank, two, bias_entries, device, *, fuse: bool, unfreeze: bool = False):
    model = _model(kind, dtype, device)
    g = torch.Generator().manual_seed(1)
    bits = {n: (torch.rand(p.shape, generator=g) < 0.35) if (p.dim() == 2 or bias_entries)
            else torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    handles = [st.attach(model, st.Mask.from_dict(bits), name="a")]
    if two:
        bits = {n: (torch.rand(b.shape, generator=g) < 0.2) & (b.dim() == 2 or bias_entries)
                for n, b in bits.items()}
        handles.append(st.attach(model, st.Mask.from_dict(bits), name="b"))
    with torch.no_grad():
        for h in handles:
            for p in h.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    if unfreeze:
        model[2].weight.requires_grad_(True)
        model[0].bias.requires_grad_(True)
    calls = []
    original = functions.LinearWithDeltas.apply

    def spy(*args):
        calls.append(True)
        return original(*args)

    shape = (3, 4, 7) if rank == 3 else (5, 7)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    x.requires_grad_()
    functions.LinearWithDeltas.apply = spy
    slot.DeltaSlot.fuse = fuse
    try:
        out = model(x)
        (out.double() * torch.linspace(-1, 2, out.numel(), dtype=torch.float64,
                                       device=device).view(out.shape)).sum().backward()
    finally:
        functions.LinearWithDeltas.apply = original
        slot.DeltaSlot.fuse = True
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, len(calls)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal to the base dtype's rounding. In 16 bits the routes round differently (the fused
    layer adds each delta's float32 sums into the output or the input gradient and rounds
    once where it takes the Triton kernel, or sums two deltas in float32 and rounds once; the
    twin rounds each term), so the bound is a few units in the last place of the largest term;
    later layers' gradients inherit it."""
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * eps,
                                   atol=8 * eps * float(b.abs().max()))


@pytest.mark.parametrize("dtype,kind,rank,two,bias_entries", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_fused_layer_equals_the_base_forward_plus_delta_functions(
        device, dtype, kind, rank, two, bias_entries):
    out, gx, grads, calls = _run(kind, dtype, rank, two, bias_entries, device, fuse=True)
    ref_out, ref_gx, ref_grads, ref_calls = _run(kind, dtype, rank, two, bias_entries, device,
                                                 fuse=False)
    assert calls == 2 and ref_calls == 0
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype == dtype
    _close(out, ref_out, dtype)
    _close(gx, ref_gx, dtype)
    assert grads.keys() == ref_grads.keys() and len(grads) == (2 + 2 * bias_entries) * (1 + two)
    for name in grads:
        assert grads[name].dtype == ref_grads[name].dtype
        _close(grads[name], ref_grads[name], dtype)


@pytest.mark.parametrize("route", [(0.0, False), (1e9, False), (1e9, True)],
                         ids=["bags", "mkl", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_cpu_product_and_unfrozen_base_gradients(monkeypatch, dtype, route):
    """Fused layer against the hook route on every CPU product; on the C kernel's route the
    fused layer's backward is the kernel's one pass (input gradient and values' gradients), the
    hook route's the twins (CSR product of M^T and the plan's sampled product)."""
    monkeypatch.setattr(functions, "CSR_PER_LINE", route[0])
    monkeypatch.setattr(functions, "NATIVE", route[1])
    passes = []
    original = functions.native_spmm_backward_
    monkeypatch.setattr(functions, "native_spmm_backward_",
                        lambda *a, **k: passes.append(1) or original(*a, **k))
    cpu = torch.device("cpu")
    for kind in ("linear", "conv1d"):
        passes.clear()
        out, gx, grads, calls = _run(kind, dtype, 3, True, False, cpu, fuse=True, unfreeze=True)
        fused_passes = len(passes)
        ref = _run(kind, dtype, 3, True, False, cpu, fuse=False, unfreeze=True)
        assert len(passes) == fused_passes  # the hook route never takes the fused pass
        # two deltas on each of the two layers (where the C kernel compiles)
        assert fused_passes == (4 if route[1] and native_available() else 0)
        assert calls == 2 and ref[3] == 0
        assert {"2.weight", "0.bias"} <= grads.keys() and grads.keys() == ref[2].keys()
        _close(out, ref[0], dtype)
        _close(gx, ref[1], dtype)
        for name in grads:
            _close(grads[name], ref[2][name], dtype)


def test_autocast_and_quantized_weights_take_the_twin():
    model = _model("linear", torch.float32, torch.device("cpu"))
    mask = st.Mask.from_dict({n: torch.ones(p.shape, dtype=torch.bool)
                              for n, p in model.named_parameters()})
    handle = st.attach(model, mask, name="a")
    x = torch.randn(4, 7)
    calls = []
    original = functions.LinearWithDeltas.apply
    functions.LinearWithDeltas.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16 and calls == []
        out.float().sum().backward()
        assert all(p.grad is not None for p in handle.parameters())
        # a weight that is not a plain tensor (as after a requantizing merge) keeps its forward
        model[0].weight = nn.Parameter(_Marked(model[0].weight.detach()), requires_grad=False)
        model(x)
        assert calls == [1]  # the second layer only
    finally:
        functions.LinearWithDeltas.apply = original


class _Marked(torch.Tensor):
    """A tensor subclass standing for a quantized weight."""


def test_forward_is_restored_on_remove_and_carried_by_deepcopy_and_pickle():
    model = _model("linear", torch.float64, torch.device("cpu"))
    x = torch.randn(4, 7, dtype=torch.float64)
    plain = model(x)
    bits = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}
    handle = st.attach(model, st.Mask.from_dict(bits), name="a")
    assert "forward" in model[0].__dict__
    with torch.no_grad():
        for p in handle.parameters():
            p.fill_(0.25)
    shifted = model(x)
    assert not torch.allclose(shifted, plain)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[0].forward.layer is clone[0]
        torch.testing.assert_close(clone(x), shifted, rtol=0, atol=0)
        assert getattr(clone[0], SLOT) is not getattr(model[0], SLOT)
    handle.remove()
    assert "forward" not in model[0].__dict__ and not hasattr(model[0], SLOT)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_activation_checkpointing_and_compile_give_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    model = _model("linear", torch.float64, torch.device("cpu"))
    bits = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) < 0.4
            for n, p in model.named_parameters()}
    handle = st.attach(model, st.Mask.from_dict(bits), name="a")
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(generator=torch.Generator().manual_seed(5))
    x = torch.randn(6, 7, dtype=torch.float64)
    runs = {"eager": lambda: model(x),
            "checkpoint": lambda: checkpoint(model, x, use_reentrant=False),
            "compile": lambda: torch.compile(model, backend="eager")(x)}
    results = {}
    for name, run in runs.items():
        out = run()
        grads = torch.autograd.grad(out.square().sum(), list(handle.parameters()))
        results[name] = (out.detach(), grads)
    for name in ("checkpoint", "compile"):
        torch.testing.assert_close(results[name][0], results["eager"][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(results[name][1], results["eager"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_layer_with_its_own_instance_forward_keeps_it_and_gets_the_hook():
    """accelerate's device-map hooks set an instance ``forward``: attach leaves it in place
    (the deltas come from the hook) and remove() does not take it away."""
    import functools

    model = _model("linear", torch.float64, torch.device("cpu"))
    calls = []

    def wrapped(module, x):
        calls.append(1)
        return nn.Linear.forward(module, x)

    model[0].forward = functools.partial(wrapped, model[0])
    own = model[0].forward
    x = torch.randn(4, 7, dtype=torch.float64)
    bits = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}
    handle = st.attach(model, st.Mask.from_dict(bits), name="a")
    assert model[0].forward is own and isinstance(model[2].forward, slot._FusedForward)
    with torch.no_grad():
        for p in handle.parameters():
            p.fill_(0.5)
    slot.DeltaSlot.fuse = False
    try:
        ref = model(x)
    finally:
        slot.DeltaSlot.fuse = True
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2
    handle.remove()
    assert model[0].forward is own and "forward" not in model[2].__dict__


def test_a_first_layer_without_input_gradient_takes_the_values_pass_alone(monkeypatch):
    """Input that needs no gradient (a first layer over frozen embeddings): the fused
    backward computes the values' gradients alone in the kernel's pass, equal to the hook
    route's sampled product (float64)."""
    passes = []
    original = functions.native_spmm_backward_
    monkeypatch.setattr(functions, "native_spmm_backward_",
                        lambda *a, **k: passes.append(a[0]) or original(*a, **k))

    def run(fuse: bool):
        torch.manual_seed(0)
        model = nn.Linear(9, 11).double()
        bits = {"weight": torch.rand(11, 9) < 0.3, "bias": torch.zeros(11, dtype=torch.bool)}
        handle = st.attach(model, st.Mask.from_dict(bits), name="a")
        with torch.no_grad():
            for p in handle.parameters():
                p.normal_()
        slot.DeltaSlot.fuse = fuse
        try:
            x = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            model(x).pow(2).sum().backward()
        finally:
            slot.DeltaSlot.fuse = True
        return [p.grad for p in handle.parameters()]

    fused = run(True)
    assert len(passes) == (1 if native_available() else 0)
    assert all(p is None for p in passes)  # no input gradient buffer
    hook = run(False)
    assert len(passes) == (1 if native_available() else 0)  # the hook route: none more
    for a, b in zip(fused, hook, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
