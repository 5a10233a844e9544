"""benchmarks/gpu.py in its ``--small`` form: tiny shapes on the CPU, every row, JSON written
where asked (never into the repository), a failing row recorded and the run going on."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
from benchmarks import gpu


def test_small_run_measures_every_row_and_writes_json(tmp_path):
    out = tmp_path / "gpu-small.json"
    result = gpu.main(["--small", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"])) and written["complete"]
    assert [r["row"] for r in written["rows"]] == list(gpu.ROWS)
    env = written["environment"]
    assert env["device_name"] == "cpu" and env["torch"] and "triton" in env and "peft" in env
    by_row = {r["row"]: r for r in written["rows"]}
    for key, row in by_row.items():
        assert "error" not in row, (key, row.get("traceback"))
        assert row["step_ms"] > 0 and len(row["times_ms"]) == written["steps"], key
    lora = by_row["lora"]["trained"]
    for key in ("st_global_dense", "st_qv_dense", "st_qv_prepare", "st_global_prepare"):
        assert abs(by_row[key]["trained"] - lora) <= 1, key  # LoRA's count, to rounding
    assert by_row["opt_sparse"]["trained"] < by_row["opt_fused"]["trained"] // 100


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(gpu.ROWS, "full", ("full fine-tuning", broken))
    out = tmp_path / "gpu.json"
    result = gpu.main(["--small", "--rows", "full", "opt_sparse", "--output", str(out)])
    full, opt = result["rows"]
    assert full["error"] == "RuntimeError: out of memory (simulated)"
    assert "error" not in opt and opt["step_ms"] > 0
    assert json.loads(out.read_text())["rows"][0]["error"] == full["error"]
