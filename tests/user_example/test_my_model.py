"""A user's own test file: the one README shows under "Use 3" (tests/reliability/
test_readme_standalone.py checks the two are the same and runs it with plain pytest, no conftest).
It imports nothing from the sparsetune test suite; copy it next to your model and replace
``make_model``."""

import torch
from hypothesis import given, settings
from torch import nn

import sparsetune as st
from sparsetune import testing as stt

HEAD = ["2.weight", "2.bias"]


def make_model():  # your model here
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def make_optimizer(model, mask):  # your optimizer set-up here
    opt = st.SparseAdamW(model, mask, lr=1e-3, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=10)


@settings(deadline=None)  # hypothesis's default 200 ms per example is too short for most models
@given(mask=stt.masks(make_model(), density=stt.densities(min_value=0.01), always_train=HEAD))
def test_frozen_entries_never_move(mask):
    stt.check_optimizer_respects_mask(make_optimizer, make_model(), mask, steps=3)


@settings(deadline=None, max_examples=5)
@given(problem=stt.sparse_problems(density=0.3))
def test_masked_adamw_on_tiny_problems(problem):
    def masked_adamw(model, mask):
        return st.MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mask, model)

    stt.check_optimizer_respects_mask(masked_adamw, problem.model, problem.mask, steps=2,
                                      loss_fn=problem.loss_fn, data=problem.data,
                                      require_progress=False)


def test_sparse_tuning_is_stable_within_the_bound():
    torch.manual_seed(1)
    x, y = torch.randn(24, 8), torch.randint(0, 2, (24,))
    dataset = list(zip(x, y))
    mask = st.select(make_model(), "random", 0.05, always_train=HEAD)

    def train(examples, mask):
        model = make_model()
        opt = st.SparseAdamW(model, mask, lr=1e-2)
        xs, ys = torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()
        return model

    def loss(model, example):
        return nn.functional.cross_entropy(model(example[0][None]), example[1][None])

    measured = stt.empirical_stability(train, dataset, mask, loss_fn=loss, num_removals=6)
    model = train(dataset, mask)
    stt.assert_frozen(model, make_model().state_dict(), mask)
    report = st.bounds.diagnose(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                                [(x, y)], mask)
    print(measured, report, sep="\n")
    # at p = 5% the regularised Hessian is positive definite: E3 gives a finite bound
    assert report.applies, report.reason
    assert report.stability_at_p is not None and report.stability_at_p > 0
