"""SAM after a head-only warm-up (``head_warmup_steps``): against a hand-written linear probe."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsetune as st
from sparsetune.errors import InvalidArgumentError
from sparsetune.select import sam_curvature_scores, sam_scores

HEAD = ["2.weight", "2.bias"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(10, 6, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (10,), generator=gen))
        for _ in range(4)
    ]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _probed(model, data, steps, lr):
    """The reference: a copy whose head alone took ``steps`` AdamW steps, cycling over data."""
    probe = copy.deepcopy(model)
    head = [p for n, p in probe.named_parameters() if n in HEAD]
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
    for step in range(steps):
        opt.zero_grad()
        _loss(probe, data[step % len(data)]).backward()
        opt.step()
    return probe


@pytest.mark.parametrize("steps", [1, 6])
def test_sam_scores_the_gradient_after_a_head_only_probe(steps):
    model, data = _model(), _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = st.select(model, "sam", 0.2, data=data, loss_fn=_loss, always_train=HEAD,
                    head_warmup_steps=steps, head_warmup_lr=0.05, progress=False)
    probe = _probed(model, data, steps, 0.05)
    scores = sam_scores(probe, _loss, data)
    want = st.Mask.top_k(scores, 0.2, always_train=HEAD)
    assert got.digest() == want.digest()
    # The probe moved the head, so the scores differ from those at the random head ...
    plain = sam_scores(model, _loss, data)
    assert not torch.allclose(scores["0.weight"], plain["0.weight"])
    # ... and the model is left exactly as found.
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_sam_curvature_scores_after_the_probe_too():
    model, data = _model(), _data()
    options = dict(curvature_method="exact", floor_fraction=0.1)
    got = st.select(model, "sam_curvature", 0.2, data=data, loss_fn=_loss, always_train=HEAD,
                    head_warmup_steps=3, head_warmup_lr=0.05, progress=False, **options)
    probe = _probed(model, data, 3, 0.05)
    scores = sam_curvature_scores(probe, _loss, data, exclude=HEAD, progress=False, **options)
    assert got.digest() == st.Mask.top_k(scores, 0.2, always_train=HEAD).digest()


def test_no_warm_up_is_plain_sam():
    model, data = _model(), _data()
    plain = st.select(model, "sam", 0.2, data=data, loss_fn=_loss, always_train=HEAD,
                      progress=False)
    zero = st.select(model, "sam", 0.2, data=data, loss_fn=_loss, always_train=HEAD,
                     head_warmup_steps=0, progress=False)
    assert plain.digest() == zero.digest()


def test_a_warm_up_needs_a_head_a_reiterable_data_set_and_a_positive_step_count():
    model, data = _model(), _data()
    with pytest.raises(InvalidArgumentError, match="always_train is empty"):
        st.select(model, "sam", 0.2, data=data, loss_fn=_loss, head_warmup_steps=2)
    with pytest.raises(InvalidArgumentError, match="one-shot iterator"):
        st.select(model, "sam", 0.2, data=iter(data), loss_fn=_loss, always_train=HEAD,
                  head_warmup_steps=2)
    with pytest.raises(InvalidArgumentError, match="head_warmup_steps"):
        st.select(model, "sam", 0.2, data=data, loss_fn=_loss, always_train=HEAD,
                  head_warmup_steps=-1)
