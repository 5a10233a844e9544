"""The benchmark scripts run end to end in their quick configurations (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from benchmarks import gather_floor, optimizer


def test_optimizer_benchmark_quick(tmp_path):
    result = optimizer.main(["--quick", "--output-dir", str(tmp_path), "--busy-threshold", "-1"])
    written = json.loads((tmp_path / "optimizer-quick.json").read_text())
    assert written["status"] == "complete"
    labels = {row["label"] for row in result["optimizer_step"]}
    assert any(label.startswith("SparseAdamW") for label in labels)
    sparse = [r for r in result["optimizer_step"] if r["optimizer"] == "sparse_adamw"]
    assert all(r["state_ratio_vs_dense"] < 0.2 for r in sparse)
    compact = {r["requested_density"]: r for r in result["optimizer_step"]
               if r["optimizer"] == optimizer.COMPACT_STEP}
    assert set(compact) == {r["requested_density"] for r in sparse}
    assert all(compact[r["requested_density"]]["num_selected"] == r["num_selected"]
               for r in sparse)


def test_gather_floor_quick(tmp_path):
    result = gather_floor.main(["--quick", "--output-dir", str(tmp_path)])
    assert (tmp_path / "gather_floor-quick.json").exists()
    rows = result["median_seconds"]  # the table's row names, not timings
    assert {"gather (index_select)", "3 passes"} <= set(rows)


def test_sparse_training_benchmark_quick(tmp_path):
    from benchmarks import sparse_training

    result = sparse_training.main(["--quick", "--output-dir", str(tmp_path)])
    written = json.loads((tmp_path / "sparse_training-quick.json").read_text())
    assert written["status"] == "complete"
    rows = {r["method"]: r for r in result["task"]}
    assert set(rows) == set(sparse_training.METHODS)
    assert all("error" not in r for r in result["task"] + result["bert_base"])
    assert rows["sparse"]["compact_tensors"] > 0 and rows["sparse"]["fallback_tensors"] == []
    # the same mask everywhere: the same number of trained entries, far fewer than full
    assert rows["sparse"]["trained_entries"] == rows["masked"]["trained_entries"]
    assert rows["sparse"]["trained_entries"] < rows["full"]["trained_entries"] / 50
    assert {t["verdict"] for t in result["targets"]} <= {"PASS", "MISS"}


def _attach_quick(tmp_path, *extra):
    from benchmarks import attach

    result = attach.main(["--steps", "3", "--rounds", "3", "--warmup", "1", "--batch", "2",
                          "--length", "8", "--repeats", "1", "--threads", "1",
                          "--output-dir", str(tmp_path), *extra])
    written = json.loads((tmp_path / "attach.json").read_text())
    assert written["attach_over_inplace"] == result["attach_over_inplace"]
    assert all("error" not in r for r in result["rows"])
    interleaved = result["interleaved"]
    assert set(interleaved["variants"]) == set(attach.VARIANTS)
    assert all(len(v["step_times_s"]) == 3 for v in interleaved["variants"].values())
    assert result["attach_over_inplace"]["step_median_s"] == interleaved[
        "paired_ratio_median"]["attach"]
    assert len({r["num_selected"] for r in result["rows"]}) == 1  # one mask for all
    native = {r["variant"]: r["native_kernel"] for r in result["rows"]}
    assert native["attach"] and not native["attach_mkl"]
    return result


def test_attach_benchmark_quick(tmp_path):
    """One process per variant under glibc's default allocator, and the interleaved run (the
    live-peak runs, a second child per variant, are the slow test below)."""
    result = _attach_quick(tmp_path, "--mmap-threshold", "0")
    assert len(result["rows"]) == 3 and {r["mmap_threshold"] for r in result["rows"]} == {0}
    assert set(result["attach_over_inplace"]) == {
        "step_median_s", "step_median_s_mkl", "step_median_s_separate",
        "peak_rss_bytes_glibc_default"}


@pytest.mark.slow
def test_attach_benchmark_quick_with_live_peaks(tmp_path):
    result = _attach_quick(tmp_path)
    assert len(result["rows"]) == 6
    assert {r["mmap_threshold"] for r in result["rows"]} == {0, 65536}
    assert set(result["attach_over_inplace"]) == {
        "step_median_s", "step_median_s_mkl", "step_median_s_separate", "peak_rss_bytes",
        "peak_rss_bytes_glibc_default"}


def test_delta_products_benchmark_quick(tmp_path):
    from benchmarks import delta_products

    result = delta_products.main(["--quick", "--output-dir", str(tmp_path)])
    written = json.loads((tmp_path / "delta_products-quick.json").read_text())
    assert written["rows"] == result["rows"] and len(result["rows"]) == 2
    assert result["native_kernel"]  # CI has a C compiler (test_kernel_native)
    for row in result["rows"]:
        assert set(row["median_ms"]) == {"native", "mkl", "bags"}
        assert row["layout_route"] == "native"  # both within NATIVE_PER_LINE
