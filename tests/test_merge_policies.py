"""merge_deltas policies "ties" and "dare", and overlap_report, against dense float64
references written out by hand (TIES: Yadav et al. 2023; DARE: Yu et al. 2024)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetune as st


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()


def _delta(seed: int, density: float = 0.5) -> st.SparseDelta:
    base = _base()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    bits = {n: torch.rand(p.shape, generator=g) < density for n, p in base.named_parameters()}
    with torch.no_grad():
        for n, p in base.named_parameters():
            p += torch.randn(p.shape, generator=g, dtype=torch.float64) * bits[n]
    return st.SparseDelta.extract(base, state, st.Mask.from_dict(bits))


def _flat_dense(delta: st.SparseDelta, names: list[str], shapes: dict) -> tuple:
    """dtheta over every parameter, flattened and concatenated; and the support, likewise."""
    dense, support = delta.to_dense(), delta.support()
    d = torch.cat([dense[n].reshape(-1) if n in dense else torch.zeros(shapes[n].numel(),
                   dtype=torch.float64) for n in names])
    s = torch.cat([support[n].reshape(-1) if n in dense else torch.zeros(
        shapes[n].numel(), dtype=torch.bool) for n in names])
    return d, s


def _merged_flat(merged: st.SparseDelta, names: list[str], shapes: dict) -> torch.Tensor:
    return _flat_dense(merged, names, shapes)[0]


def _setup(count: int = 3):
    deltas = [_delta(10 + i) for i in range(count)]
    shapes = {n: p.shape for n, p in _base().named_parameters()}
    names = list(shapes)
    flats = [_flat_dense(d, names, shapes) for d in deltas]
    return deltas, shapes, names, flats


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_a_dense_reference(density):
    deltas, shapes, names, flats = _setup()
    trimmed = []
    for d, support in flats:  # trim: the top `density` fraction of the delta's own entries
        k = int(density * int(support.sum()))
        magnitudes = torch.where(support, d.abs(), torch.full_like(d, -1.0))
        keep = torch.zeros_like(support)
        keep[torch.topk(magnitudes, k).indices] = True
        trimmed.append(torch.where(keep, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    elected = torch.sign(stack.sum(0))
    expected = torch.zeros_like(elected)
    for i in range(stack.shape[1]):  # disjoint mean, entry by entry
        agreeing = [float(v) for v in stack[:, i] if v != 0 and torch.sign(v) == elected[i]]
        expected[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    merged = st.merge_deltas(deltas, policy="ties", density=density)
    torch.testing.assert_close(_merged_flat(merged, names, shapes), expected, rtol=0, atol=1e-12)
    union = torch.stack([s for _, s in flats]).any(0)
    assert merged.num_entries == int(union.sum())


def test_dare_equals_a_dense_reference_and_is_seeded():
    deltas, shapes, names, flats = _setup()
    density, seed = 0.4, 7
    expected = torch.zeros_like(flats[0][0])
    for t, (d, support) in enumerate(flats):
        values = d[support]  # the delta's entries in its own order (row-major per parameter)
        g = torch.Generator().manual_seed(seed + t)
        keep = torch.rand(values.numel(), generator=g, dtype=torch.float64) < density
        dropped = torch.zeros_like(d)
        dropped[support] = torch.where(keep, values / density, torch.zeros_like(values))
        expected += dropped
    merged = st.merge_deltas(deltas, policy="dare", density=density, seed=seed)
    torch.testing.assert_close(_merged_flat(merged, names, shapes), expected, rtol=0, atol=1e-12)
    again = st.merge_deltas(deltas, policy="dare", density=density, seed=seed)
    other = st.merge_deltas(deltas, policy="dare", density=density, seed=seed + 1)
    assert all(torch.equal(e.tuned, again.entries[n].tuned) for n, e in merged.entries.items())
    assert any(not torch.equal(e.tuned, other.entries[n].tuned)
               for n, e in merged.entries.items())
    # density 1: no drop, no rescale -> task arithmetic
    total = st.merge_deltas(deltas, policy="sum")
    full = st.merge_deltas(deltas, policy="dare", density=1.0)
    assert all(torch.equal(e.tuned, total.entries[n].tuned) for n, e in full.entries.items())


def test_overlap_report_counts_shared_entries_and_sign_conflicts():
    deltas, _, _, flats = _setup()
    report = st.overlap_report(deltas)
    assert set(report) == {(0, 1), (0, 2), (1, 2)}
    for (i, j), row in report.items():
        (di, si), (dj, sj) = flats[i], flats[j]
        both = si & sj
        assert row.shared == int(both.sum())
        assert row.sign_conflicts == int((both & (di * dj < 0)).sum())
        assert row.only_first == int((si & ~sj).sum())
        assert row.only_second == int((sj & ~si).sum())
    assert any(row.sign_conflicts > 0 for row in report.values())


def test_sparse_policies_validate_their_arguments():
    deltas = [_delta(1), _delta(2)]
    with pytest.raises(st.InvalidArgumentError, match="density"):
        st.merge_deltas(deltas, policy="ties", density=0.0)
    with pytest.raises(st.InvalidArgumentError, match="policy"):
        st.merge_deltas(deltas, policy="magic")
    merged = st.merge_deltas(deltas, policy="ties")  # the paper's default density, 0.2
    base = _base()
    merged.apply_to(base)
    merged.revert_from(base)
