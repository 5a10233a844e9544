"""SAM scores: the practical g^2 against a hand loop, the exact g^2 / h against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch.func import functional_call, grad, hessian

import sparsetune as st
from sparsetune.errors import CurvatureError
from sparsetune.select import (
    accumulated_gradient,
    floored_curvature,
    method_info,
    sam_curvature_scores,
    sam_scores,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=gen),
        )
        for _ in range(5)
    ]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_accumulated_gradient_equals_clipped_training_gradients(max_norm):
    model, data = _model(), _data()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = accumulated_gradient(model, _loss, data, num_batches=4, max_grad_norm=max_norm)
    assert model.training  # mode restored
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for batch in data[:4]:
        model.zero_grad()
        _loss(model, batch).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        for n, p in model.named_parameters():
            reference[n] += p.grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], reference[n], rtol=0, atol=1e-12)
        assert torch.equal(p.detach(), before[n])
    scores = sam_scores(model, _loss, data, num_batches=4, max_grad_norm=max_norm)
    for n in scores:
        torch.testing.assert_close(scores[n], reference[n] ** 2, rtol=0, atol=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(st.InvalidArgumentError, match="num_batches"):
        accumulated_gradient(_model(), _loss, _data(), num_batches=0)
    with pytest.raises(st.InvalidArgumentError, match="no batch"):
        accumulated_gradient(_model(), _loss, [])


# -- sam_curvature: the exact criterion g_i^2 / h_i --------------------------------------------


def _tiny(kind, seed):
    """8 parameters: a softmax regression (convex, h > 0) or a tanh net (h of both signs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return torch.nn.Linear(3, 2).double()
        return torch.nn.Sequential(
            torch.nn.Linear(1, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2, bias=False)
        ).double()


def _tiny_data(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    d_in = 3 if kind == "linear" else 1
    return [
        (torch.randn(4, d_in, generator=gen, dtype=torch.float64) * 2,
         torch.randint(0, 2, (4,), generator=gen))
        for _ in range(3)
    ]


def _second_order_model(model, data):
    """L0, g and the exact diag(H) of L = sum_b loss_b, by torch.func on the flat vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def total_loss(flat):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[start:start + s.numel()].reshape(s)
            start += s.numel()
        return sum(
            torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
            for x, y in data
        )

    return (float(total_loss(theta0)), grad(total_loss)(theta0),
            torch.diagonal(hessian(total_loss)(theta0)), names)


def _brute_force_best_mask(l0, g, h, k):
    """Minimise L0 + g^T M d + 1/2 (M d)^T diag(h) (M d) over d, for every mask of size k."""
    best, best_value, values = None, float("inf"), []
    for support in itertools.combinations(range(g.numel()), k):
        s = list(support)
        d = torch.linalg.solve(torch.diag(h[s]), -g[s])  # the quadratic's stationary point
        value = l0 + float(g[s] @ d) + 0.5 * float(d @ torch.diag(h[s]) @ d)
        values.append(value)
        if value < best_value:
            best, best_value = s, value
    return best, best_value, sorted(values)


@given(kind=hs.sampled_from(["linear", "tanh"]), seed=hs.integers(0, 10_000),
       k=hs.integers(1, 7))
def test_sam_curvature_with_exact_h_is_the_brute_force_best_mask(kind, seed, k):
    model, data = _tiny(kind, seed), _tiny_data(kind, seed)
    l0, g, h, names = _second_order_model(model, data)
    epsilon = 0.1 * float(h.abs().mean())  # the documented default floor
    h = h.clamp(min=epsilon)
    support, value, values = _brute_force_best_mask(l0, g, h, k)
    mask = st.select(model, "sam_curvature", k / 8, data=data, loss_fn=_loss,
                     curvature_method="exact", max_grad_norm=None, progress=False)
    chosen = torch.cat([mask[n].reshape(-1) for n in names]).nonzero().flatten().tolist()
    assert mask.num_selected == k
    if values[1] - values[0] > 1e-9 * max(1.0, abs(value)):  # a unique minimiser
        assert chosen == support
    else:  # a tie: the chosen mask attains the minimum
        d = -g[chosen] / h[chosen]
        got = l0 + float(g[chosen] @ d) + 0.5 * float((h[chosen] * d) @ d)
        assert got == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_a_huge_floor_gives_the_practical_ranking_and_scores_are_exact():
    model, data = _model(), _data()
    g = accumulated_gradient(model, _loss, data)
    h = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype) - 0.3
         for n, t in g.items()}
    scores = sam_curvature_scores(model, _loss, data, curvature=h, floor=0.05)
    for n in g:
        torch.testing.assert_close(scores[n], g[n] ** 2 / h[n].clamp(min=0.05), rtol=0, atol=0)
    huge = st.select(model, "sam_curvature", 0.3, data=data, loss_fn=_loss, curvature=h,
                     floor_fraction=1e12, progress=False)
    assert huge == st.select(model, "sam", 0.3, data=data, loss_fn=_loss, progress=False)


def test_sam_curvature_with_hutchinson_is_deterministic_and_leaves_the_model_alone():
    model, data = _model(), _data()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(data=data, loss_fn=_loss, num_samples=4, num_batches=3, progress=False)
    a = st.select(model, "sam_curvature", 0.25, seed=1, always_train=["3.bias"], **kw)
    assert a == st.select(model, "sam_curvature", 0.25, seed=1, always_train=["3.bias"], **kw)
    assert a.num_selected == st.budget_size(a.num_total, 0.25) and a.always_train == {"3.bias"}
    assert model.training
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    # a GGN curvature with an OutputLoss runs through the same interface
    ggn_loss = st.curvature.OutputLoss(lambda m, b: m(b[0]), lambda b: b[1], "cross_entropy")
    ggn = st.select(model, "sam_curvature", 0.25, data=data, loss_fn=ggn_loss,
                    curvature_method="ggn", floor_fraction=0.01, progress=False)
    assert ggn.num_selected == st.budget_size(ggn.num_total, 0.25)


def test_sam_curvature_refuses_bad_curvature_and_one_shot_data():
    model, data = _model(), _data()
    g = accumulated_gradient(model, _loss, data)
    bad = {n: torch.ones_like(t) for n, t in g.items()}
    bad["3.weight"][0, 0] = float("nan")
    with pytest.raises(CurvatureError, match=r"'3\.weight'.*1 NaN"):
        sam_curvature_scores(model, _loss, data, curvature=bad)
    zero = {n: torch.zeros_like(t) for n, t in g.items()}
    with pytest.raises(CurvatureError, match="0 on every scored entry"):
        sam_curvature_scores(model, _loss, data, curvature=zero)
    with pytest.raises(st.ParameterMismatchError, match=r"missing \['0.bias'\]"):
        sam_curvature_scores(model, _loss, data, curvature={n: bad[n] for n in bad if
                                                            n != "0.bias"})
    with pytest.raises(st.InvalidArgumentError, match="one-shot iterator"):
        st.select(model, "sam_curvature", 0.2, data=iter(data), loss_fn=_loss, progress=False)
    with pytest.raises(st.InvalidArgumentError, match="not both"):
        floored_curvature(zero, floor=1.0, floor_fraction=0.5)
    with pytest.raises(st.InvalidArgumentError, match="floor must be a finite number > 0"):
        floored_curvature(zero, floor=0.0)


def test_sam_curvature_is_listed():
    assert "sam_curvature" in st.METHODS
    info = method_info("sam_curvature")
    assert info.family == "sam" and info.needs_data and info.uses_density
