"""The fine-tuning burn-in of lt_sft and magnitude (issue 22: selection memory at LLM scale).

Each parameter takes its AdamW step inside backward, and |theta - theta0| is read from the model
and the copy that restores it. Both are checked, bit for bit, against the plain loop they replace
(one AdamW over every parameter, ``zero_grad``, ``backward``, ``step``; scores as full tensors),
on a model with a tied weight, an unused parameter and dropout, in float32 and bfloat16.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile

import hypothesis.strategies as st_h
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.checkpoint import checkpoint

import sparsetune as st
from sparsetune import Mask
from sparsetune.errors import InvalidArgumentError
from sparsetune.select import finetuned_values, lt_sft_scores
from sparsetune.select.methods.burn_in import Store


class _Tied(nn.Module):
    """Next-token model: embedding tied to the output head, dropout, a parameter never used."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        self.unused = nn.Linear(3, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.drop(self.emb(ids)))))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return _Tied().to(dtype)


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 11, (4, 6), generator=g) for _ in range(2)]


def _loss(model, ids):
    logits = model(ids[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))


def _reference(model, steps, lr, seed):
    """The plain loop: one AdamW over every parameter, on a copy (data cycled)."""
    ref = copy.deepcopy(model)
    ref.train()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for ids in itertools.islice(itertools.cycle(_data()), steps):
            opt.zero_grad(set_to_none=True)
            _loss(ref, ids).backward()
            opt.step()
    return {n: p.detach() for n, p in ref.named_parameters()}


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("offload", [None, "cpu", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])  # the flag turns the plain loop on
def test_burn_in_matches_the_plain_adamw_loop_bit_for_bit(dtype, checkpointing, offload):
    model = _model(dtype)
    model.body.gradient_checkpointing = checkpointing
    before = _state(model)
    want = _reference(model, steps=3, lr=0.05, seed=7)
    got = finetuned_values(model, _loss, _data(), steps=3, lr=0.05, seed=7, offload=offload)
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert not torch.equal(want["emb.weight"], before["emb.weight"])  # it did train
    assert torch.equal(got["unused.weight"], before["unused.weight"])  # no gradient: no step
    after = _state(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())

    scores = lt_sft_scores(model, _loss, _data(), steps=3, lr=0.05, seed=7, offload=offload)
    for n, p in model.named_parameters():
        assert torch.equal(scores[n], (want[n] - p.detach()).abs()), n


@pytest.mark.parametrize("offload", [None, "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_lt_sft_and_magnitude_masks_are_those_of_the_plain_scores(dtype, scope, offload):
    model = _model(dtype)
    before = _state(model)
    trained = _reference(model, steps=3, lr=0.05, seed=2)
    changed = {n: (trained[n] - p.detach()).abs() for n, p in model.named_parameters()}
    kw = dict(data=_data(), loss_fn=_loss, seed=2, lr=0.05, scope=scope, progress=False,
              offload=offload)
    got = st.select(model, "lt_sft", 0.2, steps=3, always_train=["body.bias"], **kw)
    assert got == Mask.top_k(changed, 0.2, scope, always_train=["body.bias"])
    got = st.select(model, "magnitude", 0.3, burn_in_steps=3, targets=[r"^(emb|body)\."], **kw)
    magnitude = {n: v.abs() for n, v in trained.items()}
    assert got == Mask.top_k(magnitude, 0.3, scope, targets=["emb.weight", "body.weight",
                                                            "body.bias"])
    after = _state(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_two_gradients_are_held_when_a_parameter_steps(checkpointing):
    model = _model()
    model.body.gradient_checkpointing = checkpointing  # then one AdamW steps after backward
    held = []

    def count(optimizer, args, kwargs):
        held.append(sum(p.grad is not None for p in model.parameters()))

    handle = register_optimizer_step_pre_hook(count)
    try:
        finetuned_values(model, _loss, _data(), steps=2)
    finally:
        handle.remove()
    # emb (tied head), body.weight, body.bias each step alone, 2 steps; unused never
    assert held == ([3] * 2 if checkpointing else [1] * 6)


class _SharedCheckpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = checkpoint(self.lin, x.requires_grad_(), use_reentrant=True)
        return checkpoint(self.lin, torch.tanh(x), use_reentrant=True)


def test_a_gradient_completed_twice_in_one_backward_is_refused_and_the_model_restored():
    torch.manual_seed(0)
    model = _SharedCheckpointed()
    before = _state(model)
    data = [torch.randn(3, 4)]
    with pytest.raises(InvalidArgumentError, match="completed twice in one backward"):
        finetuned_values(model, lambda m, x: m(x.clone()).square().sum(), data, steps=1)
    after = _state(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_disk_offload_holds_one_parameters_moments_at_a_time_and_leaves_no_file(
    checkpointing, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _model()
    model.body.gradient_checkpointing = checkpointing
    seen, loaded, files = [], [], []

    def count(optimizer, args, kwargs):
        if optimizer not in seen:
            seen.append(optimizer)
        loaded.append(sum("exp_avg" in s for o in seen for s in o.state.values()))
        files.append(os.listdir(tmp_path))

    handle = register_optimizer_step_pre_hook(count)
    try:
        got = finetuned_values(model, _loss, _data(), steps=3, lr=0.05, offload="disk")
    finally:
        handle.remove()
    want = _reference(model, steps=3, lr=0.05, seed=0)
    assert all(torch.equal(got[n], want[n]) for n in want)
    # 3 parameters with gradients x 3 steps; from the second step on, the stepping one's
    # moments are loaded just before its step, every other's are on disk
    assert len(loaded) == 9 and loaded[3:] == [1] * 6
    assert files == [[]] * 9 and os.listdir(tmp_path) == []  # unlinked from the start


def test_offload_is_checked_before_any_work():
    model = _model()
    kw = dict(data=_data(), loss_fn=_loss, progress=False)
    with pytest.raises(InvalidArgumentError, match="offload must be one of"):
        st.select(model, "lt_sft", 0.2, steps=1, offload="gpu", **kw)
    with pytest.raises(InvalidArgumentError, match="burn_in_steps=0 runs no burn-in"):
        st.select(model, "magnitude", 0.2, offload="disk", **kw)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st_h.lists(st_h.lists(st_h.integers(0, 5), max_size=3), min_size=1, max_size=4),
    dtype=st_h.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int64]),
    offload=st_h.sampled_from(["cpu", "disk"]),
)
def test_store_gives_back_what_was_put_last_under_each_key(shapes, dtype, offload):
    store = Store(offload)
    want = {}
    try:
        for round_ in range(2):  # the second round overwrites, sometimes with another shape
            for i, shape in enumerate(shapes):
                shape = shape if round_ == 0 or i % 2 else [*shape, 2]
                t = (torch.randn(shape) * 100).to(dtype)
                store.put(("k", i), t)
                want[("k", i)] = t.clone()
        for key, t in want.items():
            got = store.get(key, torch.device("cpu"))
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    finally:
        store.close()
