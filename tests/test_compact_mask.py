"""The compact Mask (issue 22): indices or packed bits per parameter, never a bool per entry.

Each test compares with the obvious dense computation (a bool tensor per parameter), the slow
twin, and the digests with those of the bool-per-entry Mask this replaced.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import sparsetune as st
from sparsetune import Mask
from sparsetune.errors import InvalidMaskError
from sparsetune.select.methods.rules import uniform_subset


def _dense_digest(bools, always=()):
    """Mask.digest as the bool-per-entry Mask computed it (sparsetune before issue 22)."""
    h = hashlib.sha256()
    for name in sorted(bools):
        t = bools[name]
        h.update(f"{name}\0{tuple(t.shape)}\0{'A' if name in always else 'B'}\0".encode())
        h.update(np.packbits(t.reshape(-1).numpy()).tobytes())
    return h.hexdigest()


def _bools(seed=0):
    """Masks of every form: sparse (indices), dense (bits), full, empty, 0-dim, odd sizes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "sparse": torch.rand(37, 41, generator=gen) < 0.01,
        "dense": torch.rand(13, 7, generator=gen) < 0.6,
        "full": torch.ones(5, 3, dtype=torch.bool),
        "empty": torch.zeros(9, dtype=torch.bool),
        "scalar": torch.tensor(True),
        "odd": torch.rand(1001, generator=gen) < 0.2,
    }


# digests of _bools(0) and _bools(1) with always_train=["full"], computed by the Mask of
# sparsetune's HEAD before the compact form (git show HEAD:sparsetune/mask.py)
HEAD_DIGESTS = {
    0: "5673d1e4321d957a82592ff086cde6123a8d747b050e8ada0cea6606ba59a032",
    1: "f1861e8d6f30b00f14a11636867f221860e3697f4faf466cd920cee158057c63",
}


@pytest.mark.parametrize("seed", [0, 1])
def test_digest_and_bools_are_those_of_the_bool_mask(seed):
    bools = _bools(seed)
    mask = Mask(bools, always_train=["full"])
    assert mask.digest() == _dense_digest(bools, ["full"]) == HEAD_DIGESTS[seed]
    for name, b in bools.items():
        assert torch.equal(mask[name], b) and mask[name].shape == b.shape
        assert mask.count(name) == int(b.sum()) and mask.shape(name) == b.shape
        assert torch.equal(mask.indices(name).long(), torch.nonzero(b.reshape(-1)).squeeze(1))
        assert mask.indices(name).dtype == torch.int32
        assert torch.equal(mask.packed_bits(name),
                           torch.from_numpy(np.packbits(b.reshape(-1).numpy())))
    # the same mask from indices and from packed bits: equal, same digest, same bytes
    idx = {n: torch.nonzero(b.reshape(-1)).squeeze(1).flip(0) for n, b in bools.items()}
    shapes = {n: b.shape for n, b in bools.items()}
    packed = {n: torch.from_numpy(np.packbits(b.reshape(-1).numpy())) for n, b in bools.items()}
    for other in (Mask.from_indices(shapes, idx, always_train=["full"]),
                  Mask.from_indices(shapes, packed=packed, always_train=["full"])):
        assert other == mask and other.digest() == mask.digest() and other.nbytes == mask.nbytes


def test_storage_is_the_smaller_form():
    mask = Mask(_bools())
    assert mask.count("sparse") * 4 <= 37 * 41 // 8
    sizes = {n: mask._entries[n].nbytes for n in mask}
    assert sizes["sparse"] == mask.count("sparse") * 4  # int32 indices
    assert sizes["dense"] == (13 * 7 + 7) // 8  # packed bits
    assert sizes["full"] == 0 and sizes["empty"] == 0
    assert mask.nbytes == sum(sizes.values())


def test_algebra_matches_the_bool_algebra():
    a, b = _bools(0), _bools(1)
    ma, mb = Mask(a), Mask(b)
    for got, op in [(ma | mb, torch.logical_or), (ma & mb, torch.logical_and),
                    (ma - mb, lambda x, y: x & ~y)]:
        want = {n: op(a[n], b[n]) for n in a}
        assert got == Mask(want) and got.digest() == _dense_digest(want)
    inv = ~ma
    assert inv == Mask({n: ~t for n, t in a.items()})
    assert ~inv == ma and (ma - ma).num_selected == 0 and (ma | inv).num_selected == ma.num_total
    assert (ma | Mask(b).with_always_train(["odd"])).always_train == {"odd"}


def test_a_sparse_mask_of_a_billion_entries_fits_in_fifty_megabytes():
    # 4 x 2^28 = 1.07e9 entries at p = 0.5%: 5.4M int32 indices, 21.5 MB (a bool each: 1.07 GB)
    gen = torch.Generator().manual_seed(0)
    numel = 1 << 28
    k = int(numel * 0.005)
    shapes = {f"layer{i}.weight": (1 << 14, 1 << 14) for i in range(4)}
    mask = Mask.from_indices(shapes, {n: uniform_subset(numel, k, gen) for n in shapes})
    assert mask.num_selected == 4 * k and mask.num_total == 4 * numel
    assert mask.nbytes == 4 * k * 4 <= 50e6 * (4 * numel) / 1.1e9
    assert mask.density == pytest.approx(0.005, rel=1e-6)
    assert all(mask.indices(n).dtype == torch.int32 for n in mask)
    both = mask | mask
    assert both.nbytes == mask.nbytes and (mask & mask) == mask
    assert len(mask.digest()) == 64


def test_from_indices_checks_its_input():
    with pytest.raises(InvalidMaskError, match="lie in"):
        Mask.from_indices({"w": (3,)}, {"w": torch.tensor([3])})
    with pytest.raises(InvalidMaskError, match="repeat"):
        Mask.from_indices({"w": (3,)}, {"w": torch.tensor([1, 1])})
    with pytest.raises(InvalidMaskError, match="integer"):
        Mask.from_indices({"w": (3,)}, {"w": torch.tensor([1.0])})
    with pytest.raises(InvalidMaskError, match="padding"):
        Mask.from_indices({"w": (3,)}, packed={"w": torch.tensor([0xFF], dtype=torch.uint8)})


def test_full_empty_and_names_hold_nothing_per_entry():
    model = torch.nn.Linear(300, 200)
    assert Mask.full(model).nbytes == 0 and Mask.empty(model).nbytes == 0
    assert st.select(model, "bitfit").nbytes == 0
    assert Mask.full(model) == Mask({n: torch.ones_like(p, dtype=torch.bool)
                                     for n, p in model.named_parameters()})


def test_file_bytes_are_those_of_the_bool_mask(tmp_path):
    from safetensors.torch import load_file

    bools = _bools()
    mask = Mask(bools, always_train=["full"])
    stored = load_file(mask.save(tmp_path / "m.safetensors"))
    for name, b in bools.items():
        flat = b.reshape(-1)
        if int(flat.sum()) * 4 <= (flat.numel() + 7) // 8:
            want = torch.nonzero(flat).squeeze(1).to(torch.int32)
            assert torch.equal(stored[f"idx:{name}"], want)
        else:
            want = torch.from_numpy(np.packbits(flat.numpy()))
            assert torch.equal(stored[f"bits:{name}"], want)
    again = Mask.load(tmp_path / "m.safetensors")
    assert again == mask and again.digest() == mask.digest()


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.9, 1.0])
def test_optimizer_selection_from_the_compact_form_equals_the_bool_one(density):
    """Selection.from_mask (indices read from the compact storage) is the twin of
    Selection(mask[name]) (from the bool tensor): same kind, count and indices."""
    from sparsetune.optim import Selection

    gen = torch.Generator().manual_seed(int(density * 100))
    bits = {"a": torch.rand(37, 11, generator=gen) < density,
            "b": torch.rand(300, generator=gen) < density, "c": torch.rand(2, 3, 4) < 2.0}
    mask = Mask(bits)
    for name in bits:
        fast, slow = Selection.from_mask(mask, name, "cpu"), Selection(mask[name], "cpu")
        assert (fast.kind, fast.count, fast.numel) == (slow.kind, slow.count, slow.numel)
        if slow.index is None:
            assert fast.index is None
        else:
            assert fast.index.dtype == slow.index.dtype
            assert torch.equal(fast.index, slow.index)
