"""select(..., targets=): the budget p of the whole model placed only on matching parameters.

Reference: brute force, i.e. sorting every candidate score in Python and keeping the k = floor(m p)
largest (m counts every budgeted entry, targets or not), ties to the lowest index in order.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs

import sparsetune as st
from sparsetune import Mask
from sparsetune.errors import InvalidArgumentError, ParameterMismatchError
from sparsetune.select import target_names


def brute_force_top(scores: dict[str, torch.Tensor], names: list[str], k: int) -> set:
    entries = [(float(scores[n].reshape(-1)[i]), -order, -i, n, i)
               for order, n in enumerate(names) for i in range(scores[n].numel())]
    entries.sort(reverse=True)
    return {(n, i) for *_, n, i in entries[:k]}


def chosen_entries(mask: Mask, names) -> set:
    return {(n, int(i)) for n in names for i in torch.nonzero(mask[n].reshape(-1)).reshape(-1)}


@given(
    shapes=hs.lists(hs.tuples(hs.integers(1, 5), hs.integers(1, 6)), min_size=2, max_size=5),
    pick=hs.lists(hs.booleans(), min_size=5, max_size=5),
    density=hs.sampled_from([0.01, 0.1, 0.2, 0.35, 0.5]),
    always_first=hs.booleans(),
    seed=hs.integers(0, 2**16),
)
def test_global_targets_keep_the_k_best_candidates_of_the_whole_budget(
    shapes, pick, density, always_first, seed
):
    gen = torch.Generator().manual_seed(seed)
    scores = {f"p{i}": torch.randint(0, 4, s, generator=gen).double() for i, s in enumerate(shapes)}
    names = list(scores)
    always = [names[0]] if always_first else []
    budget = [n for n in names if n not in always]
    targets = [n for n, keep in zip(budget, pick) if keep] or budget[:1]
    total = sum(scores[n].numel() for n in budget)
    k = math.floor(Fraction(repr(density)) * total)
    available = sum(scores[n].numel() for n in targets)
    if k > available:
        with pytest.raises(InvalidArgumentError, match="more than the"):
            Mask.top_k(scores, density, always_train=always, targets=targets)
        return
    if k == 0:  # a budget of no entry is refused (issue 20)
        with pytest.raises(InvalidArgumentError, match="selects no entry"):
            Mask.top_k(scores, density, always_train=always, targets=targets)
        return
    mask = Mask.top_k(scores, density, always_train=always, targets=targets)
    assert chosen_entries(mask, targets) == brute_force_top(scores, targets, k)
    for n in budget:
        if n not in targets:
            assert not mask[n].any()
    for n in always:
        assert mask[n].all()
    assert mask.num_selected == k  # num_selected counts the budget, not always_train


def test_per_tensor_targets_keep_the_same_share_of_every_target():
    scores = {"a": torch.arange(40.0).reshape(8, 5), "b": torch.arange(10.0),
              "c": -torch.arange(50.0)}
    mask = Mask.top_k(scores, 0.1, "per_tensor", targets=["a", "c"])
    # k = 10 of 100 entries over 90 target entries: a share of 1/9 of each target.
    assert int(mask["a"].sum()) == math.floor(40 / 9) and int(mask["c"].sum()) == 50 // 9
    assert not mask["b"].any()
    assert mask["a"].reshape(-1)[-4:].all() and mask["c"][:5].all()
    # targets=None and targets=everything give the plain per-tensor mask.
    plain = Mask.top_k(scores, 0.1, "per_tensor")
    assert Mask.top_k(scores, 0.1, "per_tensor", targets=list(scores)) == plain
    assert [int(plain[n].sum()) for n in scores] == [4, 1, 5]


def test_select_random_on_query_and_value_of_a_tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    head = ["classifier.weight", "classifier.bias"]
    pattern = r"attention\.self\.(query|value)\.weight$"
    mask = st.select(model, "random", 0.02, seed=1, always_train=head, targets=pattern)
    params = dict(model.named_parameters())
    body = sum(p.numel() for n, p in params.items() if n not in head)
    assert mask.num_selected == math.floor(0.02 * body) and mask.num_total == body
    touched = {n for n in params if n not in head and mask[n].any()}
    assert touched and all(re.search(pattern, n) for n in touched)
    assert len(touched) == 4  # query and value of both layers
    # Same budget as the unrestricted mask, and seeded.
    free = st.select(model, "random", 0.02, seed=1, always_train=head)
    assert free.num_selected == mask.num_selected
    assert st.select(model, "random", 0.02, seed=1, always_train=head, targets=pattern) == mask
    assert target_names(model, [r"query\.weight$", r"value\.weight$"]) == sorted(
        touched, key=list(params).index)


def test_targets_errors_name_the_problem(make_mlp):
    model = make_mlp()
    with pytest.raises(ParameterMismatchError, match="matches no trainable parameter"):
        st.select(model, "random", 0.1, targets=r"attention")
    with pytest.raises(InvalidArgumentError, match="invalid pattern"):
        st.select(model, "random", 0.1, targets="fc1(")
    with pytest.raises(InvalidArgumentError, match="does not take targets"):
        st.select(model, "bitfit", targets="fc1")
    with pytest.raises(InvalidArgumentError, match="more than the 5 entries of the targets"):
        st.select(model, "random", 0.5, targets=r"fc1\.bias")
    with pytest.raises(InvalidArgumentError, match="only always_train"):
        st.select(model, "random", 0.1, targets=r"fc2\.bias", always_train=["fc2.bias"])
    with pytest.raises(ParameterMismatchError, match="no scores"):
        Mask.top_k({"a": torch.ones(3)}, 0.5, targets=["b"])
