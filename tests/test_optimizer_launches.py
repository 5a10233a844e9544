"""Issue 23: the compact step's kernel launches do not grow with the number of tensors.

On CPU the launches are counted as the aten ops torch.profiler records during one ``step()``
(dense gradients present): a model of 10 and one of 200 parameter tensors, the same total
number of selected entries, must give the same count for ``impl="packed"`` (the opt-in path
that lays parameters and gradients end to end).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sparsetune import Mask, SparseAdamW, SparseSGD

TOTAL, SELECTED = 4000, 400


def _model(tensors: int, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(tensors)
    per = TOTAL // tensors
    shapes = [(per // 4, 4) if i % 2 else (per,) for i in range(tensors)]
    return nn.ParameterList(
        [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    )


def _mask(model: nn.Module) -> Mask:
    gen = torch.Generator().manual_seed(0)
    entries = {}
    params = list(model.named_parameters())
    for name, p in params:
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=gen)[: SELECTED // len(params)]] = True
        entries[name] = flat.view(p.shape)
    return Mask(entries)


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() ** 2 for p in model)
    loss.backward()


def _aten_ops_of_a_step(cls, tensors: int, dtype: torch.dtype, **hyper) -> int:
    model = _model(tensors, dtype)
    opt = cls(model, _mask(model), impl="packed", **hyper)
    for seed in range(3):  # the first steps build the state and the flat buffers
        opt.zero_grad()
        _backward(model, seed)
        if seed < 2:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("cls", "hyper"),
    [
        (SparseAdamW, dict(lr=0.01)),
        (SparseAdamW, dict(lr=0.01, amsgrad=True, decay_to="init")),
        (SparseSGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
        (SparseSGD, dict(lr=0.01)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_aten_ops_of_a_step_do_not_grow_with_the_tensors(cls, hyper, dtype):
    few = _aten_ops_of_a_step(cls, 10, dtype, **hyper)
    many = _aten_ops_of_a_step(cls, 200, dtype, **hyper)
    assert few == many, f"{cls.__name__}: {few} aten ops for 10 tensors, {many} for 200"
    assert few < 100


def test_gradients_accumulate_in_place_into_one_flat_buffer():
    model = _model(10, torch.float32)
    opt = SparseAdamW(model, _mask(model), lr=0.01, impl="packed")
    _backward(model, 0)
    opt.step()  # builds the flat group
    flat = next(iter(opt._flats.values()))
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        _backward(model, 1)
        grads = [p.grad.clone() for p in model]
        assert all(p.grad.untyped_storage().data_ptr() == flat.grads.data_ptr() for p in model)
        _backward(model, 2)  # a second micro-batch accumulates into the views, in place
        twin = copy.deepcopy(model)
        twin.zero_grad()
        _backward(twin, 1)
        _backward(twin, 2)
        for p, q, g in zip(model, twin, grads):
            assert p.grad.untyped_storage().data_ptr() == flat.grads.data_ptr()
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
            assert not torch.equal(p.grad, g)
    # the parameters are views of one flat buffer, which in-place writes reach
    assert all(p.untyped_storage().data_ptr() == flat.weights.data_ptr() for p in model)
    opt.zero_grad()
    assert all(p.grad is None for p in model)  # zero_grad keeps torch's meaning


@pytest.mark.parametrize("cls", [SparseAdamW, SparseSGD], ids=lambda c: c.__name__)
def test_flat_equals_the_for_loop_under_micro_batches_and_module_zero_grad(cls):
    """Two micro-batches per step, ``model.zero_grad()`` some steps, ``p.grad = None`` once,
    a ``p.data`` swap once: flat and forloop agree exactly (float64)."""
    a = _model(10, torch.float64)
    b = copy.deepcopy(a)
    mask = _mask(a)
    hyper = dict(lr=0.05, weight_decay=0.1, **({"momentum": 0.9} if cls is SparseSGD else {}))
    fast, slow = cls(a, mask, impl="packed", **hyper), cls(b, mask, impl="forloop", **hyper)
    for step in range(8):
        for m, o in ((a, fast), (b, slow)):
            (m.zero_grad if step % 2 else o.zero_grad)()
            _backward(m, 2 * step)
            _backward(m, 2 * step + 1)
            if step == 4:
                m[3].grad = None
            if step == 5:
                m[1].data = m[1].data * 0.5
            o.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert fast._flats
