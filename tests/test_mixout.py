"""Mixout: the wrapper against a hand loop of the paper's definition, with the same RNG."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch.func import functional_call

import sparsetune as st
from sparsetune import MaskedOptimizer
from sparsetune.optim import Mixout
from sparsetune.select import method_info


def _model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
        ).double()


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (6,), generator=gen))
        for _ in range(n)
    ]


def _loss(out, y):
    return torch.nn.functional.cross_entropy(out, y)


def _hand_loop(model, batches, mix_p, seed, lr):
    """Lee et al.'s mixout(u) written out: Phi = (1/(1-p)) ((I - M) u + M w - p u)."""
    names = [n for n, _ in model.named_parameters()]
    u = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)

    def draw():
        return {n: torch.empty(u[n].shape).bernoulli_(1 - mix_p, generator=gen).bool()
                for n in names}

    def phi(kept):
        return {n: torch.where(kept[n] & (w[n] != u[n]), u[n] + (w[n] - u[n]) / (1 - mix_p),
                               u[n]) for n in names}

    opt = torch.optim.AdamW(list(w.values()), lr=lr, weight_decay=0.1)
    kept = draw()
    for x, y in batches:
        mixed = {n: t.requires_grad_(True) for n, t in phi(kept).items()}
        grads = torch.autograd.grad(_loss(functional_call(model, mixed, (x,)), y),
                                    list(mixed.values()))
        for n, g in zip(names, grads):
            w[n].grad = g * kept[n] * (1.0 / (1 - mix_p))
        opt.step()
        kept = draw()
    return w, phi(kept)


@given(seed=hs.integers(0, 1000), mix_p=hs.sampled_from([0.3, 0.7, 0.9]),
       steps=hs.integers(1, 5))
def test_matches_the_papers_definition_step_by_step(seed, mix_p, steps):
    batches = _batches(steps, seed)
    reference = _model(seed)
    w_ref, phi_ref = _hand_loop(copy.deepcopy(reference), batches, mix_p, seed, lr=0.05)
    model = copy.deepcopy(reference)
    opt = Mixout(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1), mix_p,
                 seed=seed)
    for x, y in batches:
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():  # between steps the model holds Phi(w)
        torch.testing.assert_close(p.detach(), phi_ref[n], rtol=0, atol=1e-15)
    with opt.unmixed():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), w_ref[n], rtol=0, atol=1e-15)
    opt.finalize()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w_ref[n], rtol=0, atol=1e-15)
    with pytest.raises(st.InvalidArgumentError, match="finalize"):
        opt.step()


def test_mixed_weights_are_unbiased_and_mixed_entries_are_exactly_theta0():
    model = torch.nn.Linear(40, 50).double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Mixout(torch.optim.SGD(model.parameters(), lr=0.0), mix_p=0.6, seed=1)
    with opt.unmixed(), torch.no_grad():  # a trained w away from u
        for p in model.parameters():
            p.add_(1.0)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    steps = 300
    for _ in range(steps):
        opt.step()  # no gradients: w stays, only the mask is redrawn
        for n, p in model.named_parameters():
            total[n] += p.detach()
            at_u = p.detach() == theta0[n]
            rescaled = p.detach() == theta0[n] + 1.0 / 0.4
            assert bool((at_u | rescaled).all())  # an entry is u, or u + (w - u) / (1 - p)
    mean = torch.cat([(total[n] / steps - theta0[n] - 1.0).reshape(-1) for n in total])
    # each entry's Phi - w has standard deviation sqrt(p / (1 - p)) = 1.22 per draw
    sd = (0.6 / 0.4 / (steps * mean.numel())) ** 0.5
    assert abs(float(mean.mean())) < 5 * sd


def test_mix_p_zero_is_the_inner_optimizer():
    data = _batches(4)
    a, b = _model(), _model()
    opt_a = Mixout(torch.optim.AdamW(a.parameters(), lr=0.1), 0.0)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    for (x, y) in data:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_composes_with_a_fixed_mask_inside():
    model = _model()
    with torch.no_grad():
        model[0].bias[0] = -0.0  # a negative zero must survive bit for bit
    mask = st.select(model, "random", 0.3, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inner = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    opt = Mixout(MaskedOptimizer(inner, mask, model), 0.5, seed=2)
    for x, y in _batches(6):
        opt.zero_grad()
        _loss(model(x), y).backward()
        opt.step()
    for when in ("mixed", "finalized"):
        if when == "finalized":
            opt.finalize()
        for n, p in model.named_parameters():
            frozen = ~mask[n]
            assert torch.equal(p.detach()[frozen].view(torch.int64),
                               before[n][frozen].view(torch.int64)), (when, n)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert 0 < moved <= mask.num_selected


def test_changes_made_outside_mixout_are_refused():
    model = _model()
    mask = st.select(model, "random", 0.3, seed=1)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    opt = MaskedOptimizer(Mixout(inner, 0.5, seed=2), mask, model)  # the wrong order
    x, y = _batches(1)[0]
    _loss(model(x), y).backward()
    opt.step()  # weight decay moved frozen entries of w, the mask put the model's back
    with pytest.raises(st.StateMismatchError, match=r"Mixout\(MaskedOptimizer"):
        opt.step()
    model = _model()
    opt = Mixout(torch.optim.SGD(model.parameters(), lr=0.1), 0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(st.StateMismatchError, match="unmixed"):
        opt.step()


def test_resumes_exactly_from_a_state_dict():
    data = _batches(6)

    def run(steps, state=None, start=0):
        model = _model()
        opt = Mixout(torch.optim.AdamW(model.parameters(), lr=0.1), 0.7, seed=5)
        if state is not None:
            opt.load_state_dict(state)
        for x, y in data[start:start + steps]:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
        return model, opt

    full, _ = run(6)
    _, half_opt = run(3)
    buffer = io.BytesIO()
    torch.save(half_opt.state_dict(), buffer)
    buffer.seek(0)
    resumed, _ = run(3, torch.load(buffer), start=3)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    other = Mixout(torch.optim.AdamW(_model().parameters(), lr=0.1), 0.5)
    with pytest.raises(st.StateMismatchError, match="mix_p"):
        other.load_state_dict(half_opt.state_dict())
    child = st.ChildTuningF(torch.optim.AdamW(_model().parameters(), lr=0.1), 0.5)
    with pytest.raises(st.StateMismatchError, match="not saved by Mixout"):
        other.load_state_dict(child.state_dict())


def test_registry_and_bad_input():
    assert "mixout" in st.METHODS
    info = method_info("mixout")
    assert info.family == "optimizer" and "Mixout" in info.optimizer
    with pytest.raises(st.InvalidArgumentError, match="Mixout"):
        st.select(_model(), "mixout", 0.1)
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(st.InvalidArgumentError, match="mix_p must be in"):
            Mixout(torch.optim.SGD(_model().parameters(), lr=0.1), bad)
