"""SparseDelta: exact extract -> apply round trips, files, base fingerprints, merge, revert."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs

import sparsetune as st
from sparsetune import Mask, SparseDelta, merge_deltas


def _base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    return model.to(dtype)


def _finetune(model, mask, steps=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    opt = st.SparseAdamW(model, mask, lr=0.05, weight_decay=0.01)
    for _ in range(steps):
        x = torch.randn(7, 6, generator=gen).to(dtype)
        y = torch.randint(0, 3, (7,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@given(
    density=hs.sampled_from([0.02, 0.1, 0.5, 1.0]),
    seed=hs.integers(0, 50),
    dtype=hs.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_extract_apply_revert_are_bit_exact(density, seed, dtype):
    base = _base(seed, dtype)
    mask = st.select(base, "random", density, seed=seed, always_train=["2.bias"])
    tuned = _finetune(copy.deepcopy(base), mask, seed=seed)
    delta = SparseDelta.extract(tuned, _state(base), mask)
    assert delta.num_entries == mask.num_trainable
    assert delta.support() == Mask.from_dict({n: mask[n] for n in delta.names})
    rebuilt = delta.apply_to(copy.deepcopy(base))
    assert _equal(rebuilt, tuned)
    delta.revert_from(rebuilt)
    assert _equal(rebuilt, base)


def test_scale_interpolates_in_float64():
    base = _base()
    mask = st.select(base, "random", 0.3, seed=2)
    tuned = _finetune(copy.deepcopy(base), mask)
    delta = SparseDelta.extract(tuned, _state(base), mask)
    half = delta.apply_to(copy.deepcopy(base), scale=0.5)
    dense = delta.to_dense()
    for (n, p), b in zip(half.named_parameters(), base.parameters()):
        expected = (b.double() + 0.5 * dense.get(n, torch.zeros_like(b, dtype=torch.float64)))
        assert torch.equal(p, expected.float()), n


def test_norm_is_the_float64_norm_of_theta_minus_theta0():
    base = _base()
    mask = st.select(base, "random", 0.3, seed=2)
    tuned = _finetune(copy.deepcopy(base), mask)
    delta = SparseDelta.extract(tuned, _state(base), mask)
    expected = torch.cat([(t.double() - b.double()).reshape(-1)
                          for t, b in zip(tuned.parameters(), base.parameters())]).norm()
    assert delta.norm() == pytest.approx(float(expected), rel=1e-12)
    assert delta.norm() > 0


def test_file_round_trip_and_size(tmp_path):
    big = torch.nn.Linear(1000, 100)
    mask = st.select(big, "random", 0.005, seed=3)
    tuned = copy.deepcopy(big)
    opt = st.SparseAdamW(tuned, mask, lr=0.1)
    tuned(torch.randn(4, 1000)).sum().backward()
    opt.step()
    delta = SparseDelta.extract(tuned, _state(big), mask, method="random")
    path = delta.save(tmp_path / "task.safetensors")
    # 500 entries: int32 index + two float32 values = 12 bytes each, plus a small header
    assert path.stat().st_size < 500 * 12 + 3_000
    loaded = SparseDelta.load(path)
    assert loaded.method == "random" and loaded.base_fingerprint == delta.base_fingerprint
    for n, t in delta.to_dense().items():
        assert torch.equal(loaded.to_dense()[n], t)
    assert _equal(loaded.apply_to(copy.deepcopy(big)), tuned)
    with pytest.raises(st.FileFormatError, match="expected a sparsetune delta file"):
        SparseDelta.load(mask.save(tmp_path / "mask.safetensors"))


def test_wrong_base_and_double_apply_fail_loudly():
    base = _base(0)
    mask = st.select(base, "random", 0.2)
    delta = SparseDelta.extract(_finetune(copy.deepcopy(base), mask), _state(base), mask)
    with pytest.raises(st.BaseModelMismatchError, match="another base model"):
        delta.apply_to(_base(1))
    model = delta.apply_to(copy.deepcopy(base))
    with pytest.raises(st.BaseModelMismatchError):
        delta.apply_to(model)  # already applied: no longer the base
    untouched = copy.deepcopy(base)
    with pytest.raises(st.BaseModelMismatchError, match="nothing was changed"):
        delta.revert_from(base)  # the base does not hold the tuned values
    assert _equal(base, untouched)
    with pytest.raises(st.ParameterMismatchError):
        delta.apply_to(torch.nn.Linear(6, 8))


def test_strict_extract_refuses_changes_outside_the_mask():
    base = _base()
    mask = st.select(base, "random", 0.2)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight += 1.0  # moves every entry, most of them frozen
    with pytest.raises(st.BaseModelMismatchError, match=r"0\.weight \(\d+ entries\)"):
        SparseDelta.extract(tuned, _state(base), mask)
    loose = SparseDelta.extract(tuned, _state(base), mask, strict=False)
    assert loose.num_entries == mask.num_selected


def test_merge_policies():
    base = _base()
    m1, m2 = st.select(base, "random", 0.3, seed=1), st.select(base, "random", 0.3, seed=2)
    d1 = SparseDelta.extract(_finetune(copy.deepcopy(base), m1, seed=1), _state(base), m1)
    d2 = SparseDelta.extract(_finetune(copy.deepcopy(base), m2, seed=2), _state(base), m2)
    summed, mean = d1 + d2, merge_deltas([d1, d2], policy="mean")
    assert summed.support() == (m1 | m2)
    a, b = d1.to_dense(), d2.to_dense()
    overlap = m1 & m2
    for name in summed.names:
        za = a.get(name, torch.zeros(overlap[name].shape, dtype=torch.float64))
        zb = b.get(name, torch.zeros(overlap[name].shape, dtype=torch.float64))
        model_sum = summed.apply_to(copy.deepcopy(base)).get_parameter(name)
        ref = base.get_parameter(name).double() + za + zb
        assert torch.equal(model_sum, ref.float()), name
        both = overlap[name]
        torch.testing.assert_close(mean.to_dense()[name][both], (za + zb)[both] / 2)
        only = ~both
        torch.testing.assert_close(mean.to_dense()[name][only], (za + zb)[only], rtol=1e-6,
                                   atol=1e-7)
    with pytest.raises(st.InvalidArgumentError, match="overlap"):
        merge_deltas([d1, d2], policy="error")
    with pytest.raises(st.InvalidArgumentError, match="policy"):
        merge_deltas([d1, d2], policy="max")
    other = _base(5)
    foreign = SparseDelta.extract(other, _state(other), Mask.full(other))
    with pytest.raises(st.BaseModelMismatchError, match="different base"):
        merge_deltas([d1, foreign])


def test_info_travels_with_the_file_and_through_merges(tmp_path):
    base = _base()
    theta0 = _state(base)
    masks = [st.select(base, "random", 0.2, seed=s) for s in (1, 2)]
    deltas = []
    for i, mask in enumerate(masks):
        tuned = _finetune(copy.deepcopy(base), mask, seed=i)
        deltas.append(SparseDelta.extract(tuned, theta0, mask, info={"task": "a", "n": 3}))
    path = deltas[0].save(tmp_path / "d.safetensors")
    assert SparseDelta.load(path).info == {"task": "a", "n": "3"}  # strings, as saved
    assert merge_deltas(deltas).info == {"task": "a", "n": "3"}
    other = SparseDelta.extract(copy.deepcopy(base), theta0, masks[1], info={"task": "b"})
    assert merge_deltas([deltas[0], other]).info == {}  # they disagree: none kept
    plain = SparseDelta.extract(copy.deepcopy(base), theta0, masks[1])
    assert SparseDelta.load(plain.save(tmp_path / "p.safetensors")).info == {}


def _bn_base(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 3))


def _bn_delta(base, seed, mask=None):
    """A delta of ``base`` fine-tuned in train mode: the BatchNorm statistics move too."""
    mask = mask or st.select(base, "random", 0.3, seed=seed)
    tuned = _finetune(copy.deepcopy(base).train(), mask, seed=seed)
    return SparseDelta.extract(tuned, _state(base), mask), tuned


def test_buffers_scale_and_merge_like_fully_selected_parameters():
    base = _bn_base()
    (d1, t1), (d2, t2) = _bn_delta(base, 1), _bn_delta(base, 2)
    stats = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert list(d1.buffers) == stats and d1.names == tuple(d1.entries)
    half = d1.apply_to(copy.deepcopy(base), scale=0.5)
    for name in stats[:2]:
        b, t = base.get_buffer(name).double(), t1.get_buffer(name).double()
        assert torch.equal(half.get_buffer(name), (b + 0.5 * (t - b)).float()), name
    assert int(half.get_buffer(stats[2])) == round(0.5 * 5)  # integers rounded to nearest
    summed = (d1 + d2).apply_to(copy.deepcopy(base))
    b = base.get_buffer(stats[0]).double()
    expected = b + (t1.get_buffer(stats[0]).double() - b) + (t2.get_buffer(stats[0]).double() - b)
    assert torch.equal(summed.get_buffer(stats[0]), expected.float())
    assert int(summed.get_buffer(stats[2])) == 10  # 5 + 5 batches tracked
    mean = merge_deltas([d1, d2], policy="mean").apply_to(copy.deepcopy(base))
    assert int(mean.get_buffer(stats[2])) == 5
    (e1, _), (e2, _) = (_bn_delta(base, i, st.select(base, "names", include=rf"^{i}\."))
                        for i in (0, 2))  # disjoint parameters, the same statistics changed
    with pytest.raises(st.InvalidArgumentError, match=r"overlap on 4 entries of '1\.running_m"):
        merge_deltas([e1, e2], policy="error")
    single = merge_deltas([d1]).apply_to(copy.deepcopy(base))
    assert all(torch.equal(single.get_buffer(n), t1.get_buffer(n)) for n in stats)


def test_deltas_with_different_base_buffers_are_not_merged():
    base = _bn_base()
    d1, _ = _bn_delta(base, 1)
    other = copy.deepcopy(base)
    other[1].running_mean.fill_(3.0)  # same parameters (fingerprint), other statistics
    d2, _ = _bn_delta(other, 2)
    with pytest.raises(st.BaseModelMismatchError, match="different base values"):
        merge_deltas([d1, d2])
