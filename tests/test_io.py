"""Mask files: lossless round trips, compact encodings, strict loads, atomic writes."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as hs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparsetune as st
from sparsetune import Mask
from sparsetune.files import FileFormatError, describe_file, load_mask, model_fingerprint, save_mask


@given(
    shapes=hs.lists(hs.lists(hs.integers(1, 40), max_size=3), min_size=1, max_size=4),
    density=hs.floats(0.001, 1.0),
    seed=hs.integers(0, 1000),
)
def test_round_trip_is_lossless(tmp_path_factory, shapes, density, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = {f"p{i}": torch.rand(tuple(s), generator=gen) for i, s in enumerate(shapes)}
    budgeted = sum(s.numel() for n, s in scores.items() if n != "p0")
    assume(budgeted == 0 or st.budget_size(budgeted, density) >= 1)  # else refused (issue 20)
    mask = Mask.top_k(scores, density, always_train=["p0"])
    path = tmp_path_factory.mktemp("masks") / "m.safetensors"
    save_mask(mask, path, method="random")
    loaded = load_mask(path)
    assert loaded == mask and loaded.always_train == {"p0"}
    assert loaded.digest() == mask.digest()


def test_sparse_masks_are_stored_as_indices_dense_ones_as_bits(tmp_path):
    scores = {"big": torch.arange(100_000.0)}
    sparse = Mask.top_k(scores, 0.005)
    dense = Mask.top_k(scores, 0.5)
    sparse.save(tmp_path / "s.safetensors")
    dense.save(tmp_path / "d.safetensors")
    s, d = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "d.safetensors")
    assert list(s) == ["idx:big"] and s["idx:big"].dtype == torch.int32
    assert s["idx:big"].numel() == 500  # 2,000 bytes, not 100,000
    assert list(d) == ["bits:big"] and d["bits:big"].numel() == 12_500
    assert os.path.getsize(tmp_path / "s.safetensors") < 3_000


def test_load_checks_the_model_and_metadata(tmp_path):
    model = torch.nn.Linear(4, 3)
    mask = Mask.full(model)
    path = mask.save(tmp_path / "mask.safetensors", method="full")
    assert Mask.load(path, model=model) == mask
    with pytest.raises(st.ParameterMismatchError, match="weight"):
        Mask.load(path, model=torch.nn.Linear(3, 4))
    # another kind of safetensors file
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors", metadata={"kind": "delta"})
    with pytest.raises(FileFormatError, match="expected a sparsetune mask file"):
        Mask.load(tmp_path / "plain.safetensors")
    # a future format version
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(tensors, tmp_path / "v9.safetensors", metadata={**meta, "format_version": "9"})
    with pytest.raises(FileFormatError, match="format_version '9'"):
        Mask.load(tmp_path / "v9.safetensors")
    # tampered contents: digest mismatch
    tampered = {k: v.clone() for k, v in tensors.items()}
    key = next(k for k in tampered if k.startswith("bits:"))
    tampered[key][0] = 0
    save_file(tampered, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(FileFormatError, match="digest"):
        Mask.load(tmp_path / "bad.safetensors")
    # a listed parameter without its tensor
    params = [*json.loads(meta["parameters"]), ["ghost", [2], "idx"]]
    ghost_meta = {**meta, "parameters": json.dumps(params)}
    save_file(tensors, tmp_path / "ghost.safetensors", metadata=ghost_meta)
    with pytest.raises(FileFormatError, match="ghost"):
        Mask.load(tmp_path / "ghost.safetensors")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    mask = Mask.full(torch.nn.Linear(2, 2))
    target = tmp_path / "mask.safetensors"
    mask.save(target)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.write", broken)
    with pytest.raises(st.FileWriteError, match=f"cannot write {target}: disk full"):
        Mask.empty(torch.nn.Linear(2, 2)).save(target)
    assert target.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors"]  # no temp left


def test_a_mask_saved_with_its_model_refuses_another_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # not trainable: not in the mask, still in the model
    mask = st.select(model, "random", 0.5, seed=0)
    assert "1.bias" not in mask
    path = mask.save(tmp_path / "m.safetensors", method="random", model=model)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_fingerprint"] == model_fingerprint(model)
    assert meta["model_class"] == "Sequential"
    assert json.loads(meta["model_other_parameters"]) == [["1.bias", [2]]]
    # the same architecture with other values (a fine-tuned copy, another dtype) is accepted
    other_values = copy.deepcopy(model).double()
    assert Mask.load(path, model=other_values) == mask
    # another architecture: every missing, unexpected and mis-shaped name in one error
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2, bias=False))
    other.add_module("2", torch.nn.Linear(2, 2))
    with pytest.raises(st.ParameterMismatchError) as err:
        Mask.load(path, model=other)
    text = str(err.value)
    assert "made for another model (Sequential" in text
    assert "parameters the model lacks ['1.bias']" in text
    assert "did not have ['2.weight', '2.bias']" in text
    assert "0.weight: mask made for (3, 4), model has (5, 4)" in text
    assert "1.weight: mask made for (2, 3), model has (2, 5)" in text
    # a model that only lacks a parameter the mask does not cover is refused too
    trimmed = copy.deepcopy(model)
    trimmed[1].bias = None
    with pytest.raises(st.ParameterMismatchError, match=r"lacks \['1.bias'\]"):
        Mask.load(path, model=trimmed)
    assert f"made for Sequential (fingerprint {meta['model_fingerprint'][:16]}" in (
        describe_file(path)
    )


def test_files_written_without_a_model_fingerprint_still_load(tmp_path):
    """Version-1 files from before the fingerprint keys: no fingerprint, the old checks."""
    model = torch.nn.Linear(4, 3)
    mask = st.select(model, "random", 0.5, seed=0)
    path = mask.save(tmp_path / "old.safetensors", method="random")  # no model=
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    assert "model_fingerprint" not in meta and meta["format_version"] == "1"
    assert Mask.load(path, model=model) == mask
    with pytest.raises(st.ParameterMismatchError, match="weight"):
        Mask.load(path, model=torch.nn.Linear(3, 4))


def test_mask_of_the_real_minilm_at_half_a_percent_is_compact(tmp_path):
    from sparsetune.data import HEAD_PARAMETERS, load_model

    model, _ = load_model(2)
    mask = st.select(model, "random", 0.005, always_train=HEAD_PARAMETERS)
    path = mask.save(tmp_path / "minilm.safetensors", method="random", model=model)
    entries = sum(p.numel() for p in model.parameters())
    assert entries == 22_713_986
    size = os.path.getsize(path)
    assert size < 0.05 * entries  # < 5% of a one-byte-per-entry file (about 2%: int32 indices)
    assert Mask.load(path, model=model) == mask


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = Mask.full(torch.nn.Linear(2, 2)).save(tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's private 0600
