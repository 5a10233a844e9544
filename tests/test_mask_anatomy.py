"""benchmarks/mask_anatomy.py: kinds of parameters, the hindsight mask, overlaps."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks import mask_anatomy
from sparsetune import Mask, data


def test_every_parameter_of_the_embedded_model_has_one_kind():
    model, _ = data.load_model(2)
    kinds = {n: mask_anatomy.kind_of(n) for n, _ in model.named_parameters()
             if n not in data.HEAD_PARAMETERS}
    assert set(kinds.values()) == set(mask_anatomy.KINDS)
    assert kinds["bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert kinds["bert.encoder.layer.3.attention.self.key.weight"] == "attention qkv"
    assert kinds["bert.encoder.layer.3.attention.output.dense.weight"] == "attention out"
    assert kinds["bert.encoder.layer.3.attention.output.LayerNorm.bias"] == "layernorm"
    assert kinds["bert.encoder.layer.3.output.dense.weight"] == "ffn out"
    assert kinds["bert.encoder.layer.3.intermediate.dense.bias"] == "bias"
    with pytest.raises(ValueError, match="no kind"):
        mask_anatomy.kind_of("lm_head.decoder.weight")


def test_hindsight_mask_and_jaccard_match_brute_force():
    g = torch.Generator().manual_seed(0)
    shapes = {"bert.encoder.layer.0.intermediate.dense.weight": (3, 4),
              "bert.encoder.layer.0.output.dense.weight": (4, 3)}
    change = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    sizes = {**{n: 12 for n in shapes}, "bert.pooler.dense.bias": 3}  # absent: unchanged
    change["bert.pooler.dense.bias"] = torch.zeros(3)
    values = torch.cat([change[n].reshape(-1) for n in sizes]).abs()
    for k in (1, 5, 24):  # ties only among the zeros, never at the k-th value
        got = mask_anatomy.hindsight_mask(
            {n: change[n] for n in shapes}, sizes, k)
        want = values >= values.sort(descending=True).values[k - 1]
        assert torch.equal(got, want)
    a, b = (torch.rand(24, generator=g) < 0.5 for _ in range(2))
    inter = sum(x and y for x, y in zip(a.tolist(), b.tolist()))
    union = sum(x or y for x, y in zip(a.tolist(), b.tolist()))
    assert mask_anatomy.jaccard(a, b) == pytest.approx(inter / union)
    assert mask_anatomy.jaccard(a, a) == 1.0


def test_anatomy_shares_sum_to_one_and_count_every_selected_entry():
    model, _ = data.load_model(2)
    g = torch.Generator().manual_seed(1)  # one stream: independent scores in every tensor
    mask = Mask.top_k(
        {n: torch.rand(p.shape, generator=g)
         for n, p in model.named_parameters()}, 0.001, always_train=data.HEAD_PARAMETERS)
    budgeted = [n for n in mask if n not in mask.always_train]
    result = mask_anatomy.anatomy(mask, budgeted)
    assert result["selected"] == mask.num_selected
    for shares in (result["share_by_kind"], result["share_by_layer"]):
        assert sum(shares.values()) == pytest.approx(1.0)
    # a random mask spends the budget in proportion to each kind's size
    sizes = {k: 0 for k in mask_anatomy.KINDS}
    for n in budgeted:
        sizes[mask_anatomy.kind_of(n)] += mask[n].numel()
    total = sum(sizes.values())
    for kind, share in result["share_by_kind"].items():
        assert share == pytest.approx(sizes[kind] / total, abs=0.01)
    assert list(itertools.islice(result["share_by_layer"], 1)) == ["embeddings"]
