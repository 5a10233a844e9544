"""sparsetune.files: the shared parameter-table codec, and files written before the re-layout.

tests/data/legacy_*.safetensors were written by the code as it was before ``files/`` existed
(commit 3f4affc: mask, delta and subspace formats each with its own encoder). They must load,
and saving what was loaded must give the same metadata and tensors: the formats did not change.
(Not the same bytes: safetensors writes its metadata keys in no fixed order.)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from safetensors.torch import load_file, save, save_file

import sparsetune as st
from sparsetune.files import FORMAT_VERSION, atomic_save_safetensors, describe_file, read_metadata
from sparsetune.files.table import (
    check_indices,
    decode_table,
    encode_table,
    index_dtype,
    read_kind,
    read_tensors,
)
from sparsetune.subspace import Subspace

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("kind", "load"),
    [("mask", st.Mask.load), ("delta", st.SparseDelta.load), ("subspace", Subspace.load)],
)
def test_files_written_before_the_relayout_load_and_resave_to_the_same_content(tmp_path, kind,
                                                                                 load):
    legacy = DATA / f"legacy_{kind}.safetensors"
    obj = load(legacy)
    again = tmp_path / f"{kind}.safetensors"
    if kind == "mask":
        metadata = read_metadata(legacy, "mask")
        # the model-fingerprint keys are only written with model=: compare without them
        obj.save(again, method=metadata["method"])
        assert read_metadata(again, "mask")["parameters"] == metadata["parameters"]
        assert st.Mask.load(again) == obj
        stored = read_tensors(legacy, set(read_tensors(again, _keys(again))))
        for key, value in read_tensors(again, _keys(again)).items():
            assert torch.equal(value, stored[key]), key
    else:
        obj.save(again)
        assert read_metadata(again, kind) == read_metadata(legacy, kind)
        assert _keys(again) == _keys(legacy)
        stored = read_tensors(legacy, _keys(legacy))
        for key, value in read_tensors(again, _keys(again)).items():
            assert value.dtype == stored[key].dtype, key
            assert torch.equal(value, stored[key]), key


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_legacy_mask_encodings_are_both_exercised():
    rows = decode_table(DATA / "legacy_mask.safetensors",
                        read_metadata(DATA / "legacy_mask.safetensors", "mask"))
    assert {enc for _, _, enc in rows} == {"idx", "bits"}
    mask = st.Mask.load(DATA / "legacy_mask.safetensors")
    assert mask.num_selected == int(sum(int(t.sum()) for t in mask.values())) - 3
    assert mask.always_train == frozenset({"2.bias"})


row_strategy = hs.tuples(
    hs.text(alphabet="abc._0123", min_size=1, max_size=12),
    hs.lists(hs.integers(0, 2**40), max_size=4).map(tuple),
    hs.sampled_from(["idx", "bits", "dense"]),
)


@settings(deadline=None, max_examples=50)
@given(hs.lists(row_strategy, max_size=6))
def test_parameter_table_round_trip(rows):
    text = encode_table(rows)
    assert decode_table("f", {"parameters": text}) == rows
    assert json.loads(text) == [[n, list(s), e] for n, s, e in rows]


@pytest.mark.parametrize("bad", ["[", "{}", '[["a", [2], "idx", 1]]', '[["a", ["x"], "idx"]]'])
def test_damaged_parameter_table_is_one_file_format_error(bad):
    with pytest.raises(st.FileFormatError, match="damaged metadata"):
        decode_table("f.safetensors", {"parameters": bad})
    with pytest.raises(st.FileFormatError, match="damaged metadata"):
        decode_table("f.safetensors", {})


def test_index_dtype_switches_at_two_to_the_31():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


@pytest.mark.parametrize(
    ("index", "ok"),
    [(None, True), ([], True), ([0, 5], True), ([6], False), ([-1], False)],
)
def test_check_indices_against_brute_force(index, ok):
    tensor = None if index is None else torch.tensor(index, dtype=torch.int64)
    assert check_indices(tensor, (2, 3)) is ok


def test_read_tensors_is_strict_and_read_kind_reads_the_header(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(1)}, str(path),
              metadata={"kind": "mask", "format_version": FORMAT_VERSION})
    assert read_kind(path) == "mask"
    assert set(read_tensors(path, {"a", "b"})) == {"a", "b"}
    with pytest.raises(st.FileFormatError, match=r"missing \['c'\], unexpected \['b'\]"):
        read_tensors(path, {"a", "c"})
    with pytest.raises(st.FileFormatError, match="expected a sparsetune delta file"):
        read_metadata(path, "delta")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(st.FileFormatError, match="not a readable safetensors file"):
        read_kind(tmp_path / "junk.safetensors")


def test_mask_options_are_recorded_and_optional(tmp_path):
    mask = st.Mask({"w": torch.tensor([True, False, True])})
    plain = mask.save(tmp_path / "plain.safetensors", method="magnitude")
    assert "options" not in read_metadata(plain, "mask")
    recorded = mask.save(tmp_path / "opts.safetensors", method="sam",
                         options={"num_batches": 4, "seed": 1, "targets": ["q_proj"]})
    assert json.loads(read_metadata(recorded, "mask")["options"]) == {
        "num_batches": 4, "seed": 1, "targets": ["q_proj"]}
    assert st.Mask.load(recorded) == mask == st.Mask.load(plain)
    with pytest.raises(st.InvalidArgumentError, match="JSON-encodable"):
        mask.save(tmp_path / "bad.safetensors", options={"fn": object()})
    assert not (tmp_path / "bad.safetensors").exists()


def _header(raw: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_safetensors_files_are_streamed_into_one_fsynced_temporary_file(tmp_path, monkeypatch):
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64), "f32": torch.randn(2, 3),
        "bf16": torch.randn(5).to(torch.bfloat16), "f16": torch.randn(1).half(),
        "i64": torch.arange(4), "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.tensor([1, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.int32),
        "f8": torch.randn(3).to(torch.float8_e4m3fn), "strided": torch.randn(4, 3).t(),
    }
    metadata = {"kind": "test", "note": "caf\u00e9"}
    listings = []
    fsync = os.fsync

    def watched(fd):
        listings.append(sorted(p.name for p in tmp_path.iterdir()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    path = atomic_save_safetensors(tensors, tmp_path / "t.safetensors", metadata)
    monkeypatch.undo()
    # the file, then the folder: one temporary file beside the target, renamed after its fsync
    (tmp, *rest), after = listings
    assert not rest and tmp.startswith(".t.safetensors.") and tmp.endswith(".sparsetune.tmp")
    assert after == ["t.safetensors"]
    loaded = load_file(path)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        bits = loaded[key].reshape(-1).view(torch.uint8)
        assert torch.equal(bits, value.contiguous().reshape(-1).view(torch.uint8)), key
    # what safetensors itself writes: the same header (but for its keys' order), the same bytes
    ours, theirs = _header(path.read_bytes()), _header(
        save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    assert ours == theirs


@pytest.mark.parametrize("load", [st.Mask.load, st.SparseDelta.load, Subspace.load, read_kind,
                                  describe_file])
def test_a_directory_or_a_device_is_not_a_regular_file(tmp_path, load):
    with pytest.raises(st.FileFormatError, match=r"is not a regular file \(it is a directory\)"):
        load(tmp_path)
    with pytest.raises(st.FileFormatError, match=r"^/dev/null is not a regular file"):
        load("/dev/null")
