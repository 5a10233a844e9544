"""Streaming selection (issue 22): exact top-k merged slice by slice, random masks without scores.

The top k is compared with the one-shot computation it replaced (all scores concatenated,
``kthvalue``, ties to the lowest flat index); ``select`` with the mask digests of the code
before the change; ``random`` with its law (multivariate hypergeometric counts, uniform
entries).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparsetune as st
import sparsetune._topk as topk
from sparsetune import Mask
from sparsetune._topk import LazyScores, StreamingTopK
from sparsetune.select.methods import rules
from sparsetune.select.methods.rules import random_mask, uniform_subset


def _one_shot(scores, k):
    """The top k before streaming: concatenate, kthvalue, ties to the lowest position."""
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    chosen = flat > threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)[: k - int(chosen.sum())]
    chosen[ties] = True
    return dict(zip(scores, chosen.split([s.numel() for s in scores.values()])))


@pytest.mark.parametrize("chunk", [8, 64, 1 << 24])
@pytest.mark.parametrize("seed", range(6))
def test_streamed_top_k_is_the_one_shot_top_k_ties_included(monkeypatch, chunk, seed):
    monkeypatch.setattr(topk, "SLICE", chunk)  # slices of 8 entries: many merges
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 9), (50,), (), (4, 4, 3), (33,)]
    scores = {f"p{i}": torch.randint(0, 5, s, generator=gen).float() for i, s in enumerate(shapes)}
    total = sum(s.numel() for s in scores.values())
    for density in (0.01, 0.1, 0.37, 0.9, 1.0):
        k = math.floor(total * density)
        if k == 0:
            continue
        mask = Mask.top_k(scores, density)
        want = _one_shot(scores, k)
        assert mask.num_selected == k
        for n in scores:
            assert torch.equal(mask[n].reshape(-1), want[n]), (density, n)
        lazy = Mask.top_k(LazyScores(scores, lambda t: t), density)
        assert lazy == mask


def test_streaming_top_k_keeps_k_and_the_floor():
    top = StreamingTopK(3)
    top.add(torch.tensor([1.0, 5.0, 5.0, 2.0]), 0)
    top.add(torch.tensor([5.0, 9.0]), 10)  # 5.0 at position 10 loses the tie to 1 and 2
    assert top.positions().tolist() == [1, 2, 11]
    assert StreamingTopK(0).positions().numel() == 0


def _tiny():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10),
                            torch.nn.Tanh(), torch.nn.Linear(10, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((p * 8).round() / 8)  # ties in |theta|
    return m


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(3)]


def _loss(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


# digests of the masks that sparsetune's HEAD (before streaming) selects on _tiny()
HEAD = [
    ("magnitude", 0.1, {}, "bfe9a76f1effab0dd1e63dbff70f59922034152bc95098dc6b3cf714c5c61f47"),
    ("magnitude", 0.3, {"scope": "per_tensor"},
     "4d7f7a03c6815d609f806521ff665b99e23d4868b4232aa8bbf17c8dc9be4a22"),
    ("magnitude", 0.05, {"targets": [r"^2\."], "always_train": ["4.bias"]},
     "20f6700e0b8cd5a00f81ad10ad1cac36eefad3f5e8920dae1abaa64ec45a223d"),
    ("bitfit", None, {}, "93e51739b1e5fd3a90fdc0e92aba8883eed0ed89d95ed37d5139abc89754a648"),
    ("names", None, {"include": r"weight$", "exclude": r"^0\."},
     "638a7da9ffa2c2625717ea3dadee925d5233b6965e1ff9279b58fe979c91d796"),
    ("child_pruning", 0.1, {"num_batches": 3},
     "50687bcdf1ef2de72ef37748abfe16399da7f9c324e61ee0ab189a49df513274"),
    ("lt_sft", 0.1, {"steps": 2},
     "cfbaafc9edd6b0da99ed9d64f1f2210e4025aed2c6fe4a151b27ffd280fdc92e"),
    ("diff_pruning", 0.1, {"steps": 2},
     "25a78ed9b6e059d8e3f1cab12655e88756452b9cbe95a595b1695e2b108feda0"),
    ("sam", 0.1, {"num_batches": 3},
     "17523b582a0e5d4250271a2b1186426ca28ecc812fe01e83c04d1af2deb7182e"),
    ("sam", 0.2, {"num_batches": 3, "scope": "per_tensor", "always_train": ["4.weight", "4.bias"]},
     "f5318b287f7b1bea09d0cb9771c832ec74745a53c9455a8a037eb778c4980553"),
]


@pytest.mark.parametrize("method,density,options,digest", HEAD)
def test_deterministic_methods_select_the_masks_they_selected_before(monkeypatch, method,
                                                                     density, options, digest):
    monkeypatch.setattr(topk, "SLICE", 16)  # and streamed in slices of 16
    if method in ("bitfit", "names"):
        mask = st.select(_tiny(), method, **options)
    else:
        mask = st.select(_tiny(), method, density, data=_data(), loss_fn=_loss, progress=False,
                         **options)
    assert mask.digest() == digest
    assert mask.nbytes <= sum(math.ceil(mask.shape(n).numel() / 8) for n in mask)


def test_magnitude_scores_are_computed_when_read():
    scores = rules.magnitude_scores(_tiny())
    assert isinstance(scores, LazyScores)
    assert torch.equal(scores["0.weight"], _tiny()[0].weight.detach().abs())


@pytest.mark.parametrize("small", [1 << 22, 0])  # permutation; draws with replacement
def test_uniform_subset_is_uniform(monkeypatch, small):
    monkeypatch.setattr(rules, "_SMALL", small)
    gen = torch.Generator().manual_seed(0)
    for n, k in [(10, 3), (10, 8), (7, 7), (5, 1)]:  # (10, 8): the complement is drawn
        hits = torch.zeros(n)
        runs = 3000
        for _ in range(runs):
            s = uniform_subset(n, k, gen)
            assert s.numel() == k and torch.equal(s, torch.unique(s)) and int(s.max()) < n
            hits[s] += 1
        p = k / n
        sd = math.sqrt(runs * p * (1 - p)) + 1e-9
        assert float((hits - runs * p).abs().max()) <= 4.5 * sd, (n, k, hits)


def test_random_counts_per_tensor_follow_the_hypergeometric_law():
    model = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros(s))
                                    for n, s in [("a", 3), ("b", 5), ("c", 8)]})
    m, k, runs = 16, 6, 4000
    counts = torch.tensor([[random_mask(model, k / m, seed=s).count(n) for n in "abc"]
                           for s in range(runs)], dtype=torch.float64)
    assert bool((counts.sum(1) == k).all())
    for j, size in enumerate([3, 5, 8]):
        q = size / m
        mean, var = k * q, k * q * (1 - q) * (m - k) / (m - 1)  # hypergeometric
        assert abs(float(counts[:, j].mean()) - mean) <= 4.5 * math.sqrt(var / runs)
        assert float(counts[:, j].var()) == pytest.approx(var, rel=0.12)


def test_random_is_seeded_exact_and_respects_scope_and_targets():
    model = _tiny()
    a = st.select(model, "random", 0.2, seed=3)
    assert a == st.select(model, "random", 0.2, seed=3) != st.select(model, "random", 0.2, seed=4)
    assert a.num_selected == math.floor(a.num_total * 0.2)
    per = st.select(model, "random", 0.5, scope="per_tensor", always_train=["4.bias"])
    for n, row in per.per_parameter().items():
        assert row.selected == (row.total if n == "4.bias" else row.total // 2)
    t = st.select(model, "random", 0.05, targets=[r"^2\."])
    assert {n for n in t if t.count(n)} <= {"2.weight", "2.bias"}
    assert t.num_selected == math.floor(t.num_total * 0.05)
