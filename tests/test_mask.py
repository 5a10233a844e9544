"""Mask: exact budgets against brute force, deterministic ties, algebra, errors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as hs

import sparsetune as st
from sparsetune import Mask

shapes = hs.lists(hs.integers(1, 5), min_size=0, max_size=3).map(tuple)
densities = hs.sampled_from([0.001, 0.01, 0.1, 0.25, 0.29, 1 / 3, 0.5, 0.7, 0.99, 1.0])


@hs.composite
def score_dicts(draw, max_tensors: int = 4):
    n = draw(hs.integers(1, max_tensors))
    out = {}
    for i in range(n):
        shape = draw(shapes)
        numel = math.prod(shape)
        # small integer scores force many ties, the hard case for exact budgets
        values = draw(hs.lists(hs.integers(-3, 3), min_size=numel, max_size=numel))
        out[f"layer{i}.weight"] = torch.tensor(values, dtype=torch.float64).reshape(shape)
    return out


def brute_force_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sort (score desc, global flat position asc), keep the first k: the documented rule."""
    values = torch.cat([s.reshape(-1) for s in scores.values()])
    flat = [(float(v), pos) for pos, v in enumerate(values)]
    keep = {pos for _, pos in sorted(flat, key=lambda t: (-t[0], t[1]))[:k]}
    out, offset = {}, 0
    for name, s in scores.items():
        bits = [offset + i in keep for i in range(s.numel())]
        out[name] = torch.tensor(bits, dtype=torch.bool).reshape(s.shape)
        offset += s.numel()
    return out


@given(score_dicts(), densities)
def test_global_top_k_matches_brute_force(scores, density):
    m = sum(s.numel() for s in scores.values())
    k = math.floor(Fraction(repr(density)) * m)
    if k == 0 and m > 0:  # a budget of no entry is refused (issue 20)
        with pytest.raises(st.InvalidArgumentError, match="selects no entry"):
            Mask.top_k(scores, density, scope="global")
        return
    mask = Mask.top_k(scores, density, scope="global")
    assert mask.num_selected == k
    assert mask.num_total == m
    expected = brute_force_top_k(scores, k)
    for name in scores:
        assert torch.equal(mask[name], expected[name]), name


@given(score_dicts(), densities)
def test_per_tensor_top_k_matches_brute_force(scores, density):
    if sum(s.numel() for s in scores.values()) and not any(
        st.budget_size(s.numel(), density) for s in scores.values()
    ):  # a budget of no entry is refused (issue 20)
        with pytest.raises(st.InvalidArgumentError, match="selects no entry"):
            Mask.top_k(scores, density, scope="per_tensor")
        return
    mask = Mask.top_k(scores, density, scope="per_tensor")
    for name, s in scores.items():
        k = st.budget_size(s.numel(), density)
        assert int(mask[name].sum()) == k
        assert torch.equal(mask[name], brute_force_top_k({name: s}, k)[name])


def test_selected_scores_dominate_unselected():
    torch.manual_seed(0)
    scores = {"a": torch.randn(30, 7), "b": torch.randn(11), "c": torch.randn(())}
    mask = Mask.top_k(scores, 0.2)
    chosen = torch.cat([scores[n][mask[n]] for n in scores])
    rest = torch.cat([scores[n][~mask[n]] for n in scores])
    assert chosen.min() >= rest.max()
    assert mask.num_selected == math.floor(0.2 * (210 + 11 + 1))


def test_budget_size_reads_density_as_written():
    assert st.budget_size(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in binary floats
    assert st.budget_size(1000, 0.005) == 5
    assert st.budget_size(3, 0.5) == 1
    assert st.budget_size(0, 0.5) == 0


def test_always_train_is_outside_the_budget():
    scores = {"body": torch.arange(100.0), "head": torch.zeros(4, 3)}
    mask = Mask.top_k(scores, 0.1, always_train=["head"])
    assert mask.num_total == 100 and mask.num_selected == 10
    assert mask.density == pytest.approx(0.1)
    assert mask["head"].all() and mask.num_always_trained == 12
    assert mask.num_trainable == 22
    assert mask["body"][90:].all() and not mask["body"][:90].any()
    assert "always trained" in mask.summary()
    assert mask.per_parameter()["head"].always_train


def test_full_empty_and_from_dict_copy_their_input():
    model = torch.nn.Linear(4, 3)
    full, empty = Mask.full(model), Mask.empty(model, always_train=["bias"])
    assert full.num_selected == full.num_total == 15 and full.density == 1.0
    assert empty.num_selected == 0 and empty["bias"].all() and empty.num_total == 12
    source = {"weight": torch.zeros(3, 4, dtype=torch.bool)}
    mask = Mask.from_dict(source)
    source["weight"][0, 0] = True
    assert not mask["weight"].any()
    with pytest.raises(TypeError):
        mask["weight"] = torch.ones(3, 4, dtype=torch.bool)  # type: ignore[index]


@given(score_dicts(max_tensors=3), densities, densities)
def test_algebra_is_elementwise(scores, p, q):
    m = sum(s.numel() for s in scores.values())
    assume(m == 0 or min(st.budget_size(m, p), st.budget_size(m, q)) >= 1)
    a = Mask.top_k(scores, p)
    b = Mask.top_k({n: -s for n, s in scores.items()}, q)
    for name in scores:
        x, y = a[name], b[name]
        assert torch.equal((a | b)[name], x | y)
        assert torch.equal((a & b)[name], x & y)
        assert torch.equal((a - b)[name], x & ~y)
        assert torch.equal((~a)[name], ~x)
    assert ~(a | b) == (~a & ~b)
    assert (a - b) | (a & b) == a
    assert (a | b).num_selected == a.num_selected + b.num_selected - (a & b).num_selected


def test_algebra_keeps_always_train_only_where_still_full():
    scores = {"w": torch.arange(10.0), "head": torch.ones(2)}
    a = Mask.top_k(scores, 0.5, always_train=["head"])
    b = Mask.top_k(scores, 0.2)
    assert (a | b).always_train == {"head"}
    assert (a & b).always_train == frozenset()
    assert (~a).always_train == frozenset() and not (~a)["head"].any()


def test_digest_equality_and_hash():
    scores = {"w": torch.arange(12.0).reshape(3, 4)}
    a, b = Mask.top_k(scores, 0.5), Mask.top_k(scores, 0.5)
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    flipped = {"w": a["w"].clone()}
    flipped["w"][0, 0] = ~flipped["w"][0, 0]
    c = Mask.from_dict(flipped)
    assert c != a and c.digest() != a.digest()
    assert a.with_always_train(["w"]).digest() != a.digest()


def test_check_against_model_lists_every_problem():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    good = Mask.full(model)
    assert good.check(model, complete=True) is good
    bad = Mask.from_dict(
        {
            "0.weight": torch.ones(3, 2, dtype=torch.bool),  # transposed shape
            "classifier.weight": torch.ones(1, dtype=torch.bool),  # not in the model
        }
    )
    with pytest.raises(st.ParameterMismatchError) as err:
        bad.check(model, complete=True)
    text = str(err.value)
    assert "classifier.weight" in text and "0.weight" in text and "(3, 2)" in text
    assert "1.bias" in text  # missing trainable parameter
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_density_outside_range_is_refused(density):
    with pytest.raises(st.InvalidArgumentError, match="density") as err:
        Mask.top_k({"w": torch.ones(4)}, density)
    assert str(density) in str(err.value)


def test_bad_scores_and_masks_are_refused_by_name():
    with pytest.raises(st.InvalidScoresError, match=r"'layer\.w'.*1 NaN"):
        Mask.top_k({"layer.w": torch.tensor([1.0, float("nan"), 2.0])}, 0.5)
    with pytest.raises(st.InvalidScoresError, match="infinite"):
        Mask.top_k({"w": torch.tensor([1.0, float("inf")])}, 0.5)
    with pytest.raises(st.InvalidScoresError, match="bool"):
        Mask.top_k({"w": torch.ones(2, dtype=torch.bool)}, 0.5)
    with pytest.raises(st.InvalidArgumentError, match="per_tensor"):
        Mask.top_k({"w": torch.ones(2)}, 0.5, scope="layerwise")
    with pytest.raises(st.InvalidMaskError, match=r"'w'.*torch.bool.*float32"):
        Mask.from_dict({"w": torch.ones(2)})
    with pytest.raises(st.ParameterMismatchError, match="head"):
        Mask.top_k({"w": torch.ones(2)}, 0.5, always_train=["head"])
    a = Mask.from_dict({"w": torch.ones(2, dtype=torch.bool)})
    b = Mask.from_dict({"v": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(st.InvalidMaskError, match="same parameters"):
        _ = a | b
    with pytest.raises(st.ParameterMismatchError, match="no parameter 'v'"):
        _ = a["v"]
