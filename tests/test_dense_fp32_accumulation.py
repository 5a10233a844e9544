"""Issue 21: dense gradients of bf16 parameters are summed in fp32 over micro-batches.

Two micro-batches whose second gradient is 2**-12 of the first: in bf16 the second is rounded
away when autograd adds it to ``.grad``; the compact optimizers keep the fp32 sum of the
selected entries, so their masters equal torch's optimizers run in fp32 on the fp32 sum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetune import Mask, SparseAdamW, SparseSGD

SHAPES = [(8, 4), (16,)]
SMALL = 2.0**-12
IMPLS = ("flat", "packed", "foreach", "forloop")


def _setup():
    gen = torch.Generator().manual_seed(0)
    model = nn.ParameterList(
        [nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in SHAPES]
    )
    model.initial = [p.detach().clone() for p in model]
    mask = Mask({n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()})
    # bf16-representable gradients, and 2**-12 of them (exact in bf16, lost in the bf16 sum)
    big = [torch.randn(s, generator=gen).bfloat16().float() for s in SHAPES]
    return model, mask, big


def _backward(model, grads):
    sum((p.float() * g).sum() for p, g in zip(model, grads)).backward()


def _micro_batches(model, big):
    _backward(model, big)
    _backward(model, [g * SMALL for g in big])


def _reference(cls, model, mask, grads_per_step, **hyper):
    """torch's optimizer in fp32 on an fp32 copy, fed the given fp32 gradients; returns the
    selected values after each step."""
    ref = [p.detach().float().clone().requires_grad_() for p in model.initial]
    torch_cls = torch.optim.SGD if cls is SparseSGD else torch.optim.AdamW
    opt = torch_cls(ref, **hyper)
    out = []
    for grads in grads_per_step:
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        out.append([r.detach().reshape(-1)[mask[n].reshape(-1)].clone()
                    for r, (n, _) in zip(ref, model.named_parameters())])
    return out


def _masters(opt, model):
    return [opt.state[p]["master"] for p in model]


def _close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def _differ(actual, expected):
    return any(not torch.allclose(a, e, rtol=1e-6, atol=1e-7) for a, e in zip(actual, expected))


CASES = [(SparseSGD, dict(lr=1.0)), (SparseAdamW, dict(lr=0.5, eps=1.0, weight_decay=0.0))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("cls", "hyper"), CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_micro_batches_are_summed_in_fp32(cls, hyper, impl):
    model, mask, big = _setup()
    opt = cls(model, mask, impl=impl, **hyper)
    fp32_sum = [g * (1 + SMALL) for g in big]
    for _step in range(3):  # the flat path is built at the first step, used afterwards
        opt.zero_grad()
        _micro_batches(model, big)
        opt.step()
    expected = _reference(cls, model, mask, [fp32_sum] * 3, **hyper)[-1]
    _close(_masters(opt, model), expected)
    bf16_sum = _reference(cls, model, mask, [big] * 3, **hyper)[-1]
    assert _differ(_masters(opt, model), bf16_sum)


@pytest.mark.parametrize(("cls", "hyper"), CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_turned_off_sums_in_bf16(cls, hyper):
    model, mask, big = _setup()
    opt = cls(model, mask, fp32_grad_accumulation=False, **hyper)
    _micro_batches(model, big)
    opt.step()
    _close(_masters(opt, model), _reference(cls, model, mask, [big], **hyper)[-1])


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_grad_restarts_the_sum(impl, set_to_none):
    model, mask, big = _setup()
    opt = SparseSGD(model, mask, lr=1.0, impl=impl)
    third = [g * 0.25 for g in big]
    _micro_batches(model, big)
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    _backward(model, third)
    opt.step()
    steps = [[g * (1 + SMALL) for g in big], third]
    _close(_masters(opt, model), _reference(SparseSGD, model, mask, steps, lr=1.0)[-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_clip_grad_norm_uses_and_keeps_the_fp32_sum(impl):
    model, mask, big = _setup()
    opt = SparseSGD(model, mask, lr=1.0, impl=impl)
    _micro_batches(model, big)
    total = opt.clip_grad_norm_(0.5)
    opt.step()
    fp32_sum = [g * (1 + SMALL) for g in big]
    names = [n for n, _ in model.named_parameters()]
    selected = [g.reshape(-1)[mask[n].reshape(-1)] for g, n in zip(fp32_sum, names)]
    norm = torch.linalg.vector_norm(torch.cat(selected))
    torch.testing.assert_close(total, norm, rtol=1e-6, atol=0)
    clipped = [g * (0.5 / (norm + 1e-6)) for g in fp32_sum]
    _close(_masters(opt, model), _reference(SparseSGD, model, mask, [clipped], lr=1.0)[-1])


def test_step_in_backward_steps_from_each_pass():
    model, mask, big = _setup()
    opt = SparseSGD(model, mask, lr=1.0)
    with opt.step_in_backward():
        _backward(model, big)
        _backward(model, [g * SMALL for g in big])
    assert all(p.grad is None for p in model)
    steps = [big, [g * SMALL for g in big]]
    _close(_masters(opt, model), _reference(SparseSGD, model, mask, steps, lr=1.0)[-1])


def test_a_pass_that_never_reaches_grad_leaves_nothing_behind():
    model, mask, big = _setup()
    opt = SparseSGD(model, mask, lr=1.0)
    _backward(model, big)
    loss = sum((p.float() * g * 3).sum() for p, g in zip(model, big))
    torch.autograd.grad(loss, list(model))
    _backward(model, [g * SMALL for g in big])
    opt.step()
    expected = _reference(SparseSGD, model, mask, [[g * (1 + SMALL) for g in big]], lr=1.0)
    _close(_masters(opt, model), expected[-1])
