"""sparsetune.testing: strategies draw what they promise, checks catch what they claim to."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsetune as st_
from sparsetune import InvalidArgumentError, Mask, budget_size
from sparsetune import testing as stt

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "head": (2, 2)}


@given(data=st.data())
def test_masks_have_exactly_the_budget(data):
    p = data.draw(stt.densities(min_value=1e-3))
    mask = data.draw(stt.masks(SHAPES, density=p, always_train=["head"]))
    assert set(mask) == set(SHAPES)
    assert {n: tuple(t.shape) for n, t in mask.items()} == SHAPES
    assert mask.num_selected == budget_size(12 + 4 + 1, p)  # head is out of the budget
    assert bool(mask["head"].all()) and mask.always_train == {"head"}


@given(mask=stt.masks(torch.nn.Linear(3, 2), density=0.5))
def test_masks_over_a_model_check_against_it(mask):
    mask.check(torch.nn.Linear(3, 2))
    assert mask.num_selected == 4  # floor(8 * 0.5)


@given(p=stt.densities(min_value=0.2, max_value=0.3))
def test_densities_stay_in_range(p):
    assert 0.2 <= p <= 0.3


def test_densities_reach_one_and_the_minimum():
    seen = set()

    @given(p=stt.densities(min_value=0.01))
    def collect(p):
        seen.add(p)

    collect()
    assert {0.01, 1.0} <= seen


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: stt.densities(min_value=0.0), "min_value"),
        (lambda: stt.densities(min_value=0.5, max_value=0.2), "min_value must be <="),
        (lambda: stt.masks({"w": (2, "x")}), "shape of 'w'"),
        (lambda: stt.masks({}), "no parameter entries"),
        (lambda: stt.masks(SHAPES, density=1.5), "density"),
        (lambda: stt.masks(SHAPES, always_train=["nope"]), "nope"),
        (lambda: stt.masks([1, 2]), "model_or_shapes"),
    ],
)
def test_strategy_arguments_are_validated(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


@given(problem=stt.sparse_problems())
def test_sparse_problems_are_consistent(problem):
    problem.mask.check(problem.model)
    total = sum(problem.loss_fn(problem.model, batch) for batch in problem.data)
    assert torch.isfinite(total)
    assert all(p.dtype == torch.float64 for p in problem.model.parameters())
    copy = problem.fresh_model()
    assert copy is not problem.model
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), problem.model.parameters()))


# -- assert_frozen ---------------------------------------------------------------------------------
def _model_and_mask(make_mlp, make_mask):
    model = make_mlp()
    return model, make_mask(model, density=0.5, seed=1)


def test_assert_frozen_passes_when_only_selected_entries_move(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p[mask[n]] += 1.0
    stt.assert_frozen(model, reference, mask)


def test_assert_frozen_names_each_moved_entry(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = torch.nonzero(~mask["fc2.weight"])[0]
    with torch.no_grad():
        model.fc2.weight[tuple(frozen)] += 1e-12
    with pytest.raises(AssertionError, match=r"fc2.weight: 1 of \d+ frozen entries moved") as e:
        stt.assert_frozen(model, reference, mask)
    assert str(tuple(int(i) for i in frozen)) in str(e.value)
    assert "fc1" not in str(e.value)


def test_assert_frozen_is_bitwise(make_mlp, make_mask):
    """0.0 -> -0.0 compares equal as numbers but is a moved entry."""
    model, mask = _model_and_mask(make_mlp, make_mask)
    frozen = tuple(torch.nonzero(~mask["fc1.bias"])[0])
    with torch.no_grad():
        model.fc1.bias[frozen] = 0.0
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.fc1.bias[frozen] = -0.0
    with pytest.raises(AssertionError, match=r"fc1\.bias"):
        stt.assert_frozen(model, reference, mask)


def test_assert_frozen_validates_its_inputs(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    with pytest.raises(InvalidArgumentError, match="reference_state lacks"):
        stt.assert_frozen(model, {}, mask)


# -- check_optimizer_respects_mask ----------------------------------------------------------------
def _sparse_adamw(model, mask):
    return st_.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)


def _masked_adamw_with_scheduler(model, mask):
    opt = st_.MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                              mask, model)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@given(mask=stt.masks({"fc1.weight": (5, 4), "fc1.bias": (5,), "fc2.weight": (3, 5),
                       "fc2.bias": (3,)}, density=stt.densities(min_value=0.05)))
def test_masked_optimizers_pass(make_mlp, mask):
    model = make_mlp()
    stt.check_optimizer_respects_mask(_sparse_adamw, model, mask, steps=3)
    stt.check_optimizer_respects_mask(_masked_adamw_with_scheduler, model, mask, steps=3)


def test_a_plain_optimizer_is_caught(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AssertionError, match="after step 1 of 2: frozen entries moved"):
        stt.check_optimizer_respects_mask(
            lambda m, _: torch.optim.AdamW(m.parameters(), lr=1e-3), model, mask, steps=2)
    # the user's model is untouched: the check works on a copy
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_weight_decay_on_frozen_entries_is_caught_with_real_gradients(make_mlp, make_mask,
                                                                      make_batches):
    """Zeroing frozen gradients is not enough (pytorch#38581): decay still moves them."""
    model, mask = _model_and_mask(make_mlp, make_mask)

    def zeroed_grads_with_decay(m, mask):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.1)
        for n, p in m.named_parameters():
            p.register_hook(lambda g, keep=mask[n]: g * keep)
        return opt

    def mse(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    with pytest.raises(AssertionError, match="frozen entries moved"):
        stt.check_optimizer_respects_mask(zeroed_grads_with_decay, model, mask, steps=2,
                                          loss_fn=mse, data=make_batches(2))


def test_an_optimizer_that_trains_nothing_is_caught(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    with pytest.raises(AssertionError, match="no selected entry moved"):
        stt.check_optimizer_respects_mask(
            lambda m, mask: st_.SparseSGD(m, mask, lr=0.0), model, mask, steps=2)
    stt.check_optimizer_respects_mask(lambda m, mask: st_.SparseSGD(m, mask, lr=0.0), model,
                                      mask, steps=2, require_progress=False)


def test_check_optimizer_arguments(make_mlp, make_mask):
    model, mask = _model_and_mask(make_mlp, make_mask)
    with pytest.raises(InvalidArgumentError, match="steps"):
        stt.check_optimizer_respects_mask(_sparse_adamw, model, mask, steps=0)
    with pytest.raises(InvalidArgumentError, match="both loss_fn and data"):
        stt.check_optimizer_respects_mask(_sparse_adamw, model, mask, loss_fn=lambda m, b: 0)
    with pytest.raises(InvalidArgumentError, match="must return an optimizer"):
        stt.check_optimizer_respects_mask(lambda m, mask: None, model, mask)


# -- empirical_stability ---------------------------------------------------------------------------
def _ridge_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(7, generator=gen, dtype=torch.float64)
    return [(x[i], y[i]) for i in range(7)]


def _ridge_fit(examples, mask):
    """Ridge regression on the selected features, in closed form (deterministic)."""
    sel = mask["w"]
    x = torch.stack([e[0] for e in examples])[:, sel]
    y = torch.stack([e[1] for e in examples])
    w = torch.linalg.solve(x.T @ x + 0.1 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    full = torch.zeros(3, dtype=torch.float64)
    full[sel] = w
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(full[None])
    return model


def _squared_error(model, example):
    x, y = example
    with torch.no_grad():
        return (model(x[None])[0, 0] - y) ** 2


def test_empirical_stability_is_the_leave_one_out_average():
    data = _ridge_problem()
    mask = Mask.from_dict({"w": torch.tensor([True, False, True])})
    estimate = stt.empirical_stability(_ridge_fit, data, mask, loss_fn=_squared_error)
    full = _ridge_fit(data, mask)
    expected = [abs(float(_squared_error(_ridge_fit(data[:i] + data[i + 1 :], mask), data[i]))
                    - float(_squared_error(full, data[i]))) for i in range(7)]
    assert estimate.values == pytest.approx(expected, rel=1e-12)
    assert estimate.mean == pytest.approx(sum(expected) / 7, rel=1e-12)
    assert estimate.stderr == pytest.approx(torch.tensor(expected).std().item() / math.sqrt(7))
    assert estimate.n == 7 and estimate.indices == tuple(range(7))
    assert "leave-one-out over 7 of n = 7" in str(estimate)


def test_empirical_stability_subsample_and_sparsity():
    data = _ridge_problem()
    sparse = Mask.from_dict({"w": torch.tensor([True, False, False])})
    dense = Mask.from_dict({"w": torch.tensor([True, True, True])})
    part = stt.empirical_stability(_ridge_fit, data, dense, loss_fn=_squared_error,
                                   num_removals=3, seed=1)
    assert len(part.values) == 3 and len(set(part.indices)) == 3
    one = stt.empirical_stability(_ridge_fit, data, sparse, loss_fn=_squared_error)
    assert one.mean >= 0 and one.maximum >= one.mean
    with pytest.raises(InvalidArgumentError, match="num_removals"):
        stt.empirical_stability(_ridge_fit, data, dense, loss_fn=_squared_error,
                                num_removals=8)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        stt.empirical_stability(_ridge_fit, data[:1], dense, loss_fn=_squared_error)
