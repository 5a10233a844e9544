"""benchmarks/quality.py: the quick configuration end to end, resuming, and its measuring parts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from benchmarks import quality
from sparsetune import budget_size, data
from sparsetune.errors import StateMismatchError


def test_quick_run_writes_table_and_resumes(tmp_path):
    summary = quality.main(["--quick", "--output-dir", str(tmp_path)])
    assert summary["status"] == "complete", summary["failed_runs"]
    runs = sorted((tmp_path / "runs").glob("*.json"))
    # lr selection: 2 methods x 2 lrs; sweep at p = 5%: 2 methods x 2 lrs.
    assert len(runs) == 8 and summary["new_runs"] == 8
    records = [json.loads(p.read_text()) for p in runs]
    for r in records:
        assert r["frozen_entries_moved"] == 0  # only the masks' entries moved
        assert 0 < r["changed_entries"] <= r["trainable_entries"]
        assert r["protocol"] == dataclasses.asdict(quality.QUICK)
        assert len(r["losses"]) == quality.QUICK.steps and not r["diverged"]
        assert (r["train"] is not None) == r["spec"]["sweep"]
    for method in ("random", "sam"):
        row = summary["table"][method]
        assert row["status"] == "ok"
        tried = {r["spec"]["lr"]: r["validation"]["score"] for r in records
                 if r["spec"]["method"] == method and not r["spec"]["sweep"]}
        assert len(tried) == 2
        best = max(tried.values())
        assert row["lr"] == min(lr for lr, v in tried.items() if v == best)  # the stated rule
        [test_score] = [r["test"]["score"] for r in records if r["spec"]["lr"] == row["lr"]
                        and r["spec"]["method"] == method and not r["spec"]["sweep"]]
        assert row["tasks"]["rotten_tomatoes"]["mean"] == pytest.approx(100 * test_score)
    assert {(r["method"], r["density"]) for r in summary["sweep"]["rows"]} == {
        ("random", 0.05), ("sam", 0.05)}
    table = (tmp_path / "table.md").read_text()
    assert "| sam |" in table and "| random |" in table and "Density sweep" in table
    assert (tmp_path / "density_sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "quality.json").read_text())["status"] == "complete"

    before = {p: p.stat().st_mtime_ns for p in runs}
    again = quality.main(["--quick", "--output-dir", str(tmp_path)])
    assert again["new_runs"] == 0  # every run is on disk: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    assert again["table"] == summary["table"]


def test_a_run_of_another_protocol_is_refused(tmp_path):
    runner = quality.Runner(quality.QUICK, tmp_path)
    spec = quality.RunSpec("rotten_tomatoes", "sam", 0.005, 0, 1e-3)
    record = {"protocol": dataclasses.asdict(dataclasses.replace(quality.QUICK, steps=5))}
    runner.path(spec).parent.mkdir(parents=True)
    runner.path(spec).write_text(json.dumps(record))
    with pytest.raises(StateMismatchError, match="steps': 5"):
        runner.run(spec)


def test_a_method_not_there_yet_is_listed_not_run(tmp_path, monkeypatch):
    missing = dataclasses.replace(quality.RECIPES["random"], missing=lambda: "not built")
    monkeypatch.setitem(quality.RECIPES, "random", missing)
    summary = quality.main(["--summary-only", "--output-dir", str(tmp_path),
                            "--tasks", "rotten_tomatoes", "--methods", "random", "sam"])
    assert summary["table"]["random"]["status"] == "not available yet: not built"
    assert summary["table"]["sam"]["status"] == "lr selection not finished"
    assert summary["status"] == "partial" and summary["new_runs"] == 0
    assert "not available yet: not built" in (tmp_path / "table.md").read_text()


def test_lr_grid_scales_with_density():
    assert quality.lr_grid("sam", 0.005, quality.LR_SCALES) == [0.000333, 0.001, 0.003]
    assert quality.lr_grid("random", 0.02, [1.0]) == [0.005]  # 1e-2 x sqrt(0.005 / 0.02)
    assert quality.lr_grid("full", None, [1.0]) == [2e-4]


@pytest.fixture(scope="module")
def tiny_bert_and_tokenizer():
    _, tokenizer = data.load_model(2)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval(), tokenizer


@pytest.mark.parametrize("metric", ["accuracy", "f1"])
def test_measure_agrees_with_data_evaluate_and_the_model_loss(tiny_bert_and_tokenizer, metric):
    model, tokenizer = tiny_bert_and_tokenizer
    split = quality.first(data.load_task("sms_spam").test, 70)  # batches of 32, 32, 6
    batches = data.batches(split, tokenizer, batch_size=32, max_length=16)
    measured = quality.measure(model, batches, metric)
    assert measured["score"] == pytest.approx(data.evaluate(model, batches, metric), abs=1e-12)
    with torch.no_grad():
        total = sum(float(model(**b).loss) * len(b["labels"]) for b in batches)
    assert measured["loss"] == pytest.approx(total / len(split), rel=1e-5)


def test_peft_rank_comes_nearest_the_budget(tiny_bert_and_tokenizer):
    pytest.importorskip("peft")
    model, _ = tiny_bert_and_tokenizer
    m = sum(p.numel() for p in model.parameters())
    for method, density in (("lora", 0.05), ("adapter", 0.02)):
        rank, targets = quality.peft_rank(model, quality.PEFT_TARGETS[method], density)
        modules = dict(model.named_modules())
        per_rank = sum(modules[t].in_features + modules[t].out_features for t in targets)
        assert len(targets) == 4 if method == "lora" else len(targets) == 2
        assert all(abs(rank * per_rank - density * m) <= abs(r * per_rank - density * m)
                   for r in range(1, 4 * rank + 2))


def _brute_force_pick(curve, grid, extensions):
    """Reference for pick_lr on a score curve: walk outwards by hand."""
    grid = list(grid)
    for _ in range(extensions + 1):
        best = max(grid, key=lambda lr: (curve(lr), -lr))
        if best == grid[0] and len(grid) > 1 and curve(grid[0]) > curve(grid[1]):
            nxt = [float(f"{grid[0] * grid[0] / grid[1]:.3g}"), *grid]
        elif best == grid[-1] and len(grid) > 1 and curve(grid[-1]) > curve(grid[-2]):
            nxt = [*grid, float(f"{grid[-1] * grid[-1] / grid[-2]:.3g}")]
        else:
            return best, grid
        if _ == extensions:
            return best, grid
        grid = nxt
    return best, grid


@pytest.mark.parametrize("peak", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1])
@pytest.mark.parametrize("extensions", [0, 1, 2])
def test_pick_lr_extends_past_a_winning_edge(peak, extensions):
    import math

    def curve(lr):  # unimodal in log lr, best at `peak`
        return -abs(math.log(lr) - math.log(peak))

    calls = []

    def score_of(lr):
        calls.append(lr)
        return curve(lr)

    grid = quality.lr_grid("sam", 0.005, quality.LR_SCALES)  # 3.33e-4, 1e-3, 3e-3
    choice = quality.pick_lr(grid, score_of, extensions)
    best, searched = _brute_force_pick(curve, grid, extensions)
    assert choice["chosen"] == best
    assert choice["grid"] == searched == sorted(calls)  # each lr trained once
    assert len(set(calls)) == len(calls)
    assert choice["extensions"] == len(searched) - 3
    assert choice["at_grid_edge"] == (best in (searched[0], searched[-1]))


def test_pick_lr_does_not_extend_a_flat_edge_and_waits_for_missing_runs():
    flat = quality.pick_lr([1e-4, 3e-4, 9e-4], lambda lr: 0.56, extensions=2)
    assert flat["chosen"] == 1e-4 and flat["grid"] == [1e-4, 3e-4, 9e-4]  # ties: smaller lr
    assert flat["at_grid_edge"] and flat["extensions"] == 0
    scores = {1e-4: 0.5, 3e-4: 0.6, 9e-4: 0.7}  # the extension 2.7e-3 has not run yet
    assert quality.pick_lr(list(scores), scores.get, extensions=1) is None
    assert quality.pick_lr(list(scores), scores.get, extensions=0)["chosen"] == 9e-4


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_claimed_by_a_live_worker_is_left_to_it_and_a_stale_claim_is_taken_over(
        tmp_path, monkeypatch):
    runner = quality.Runner(quality.QUICK, tmp_path)
    spec = quality.RunSpec("rotten_tomatoes", "random", 0.05, 0, 1e-3)
    trained = []
    record = {"validation": {"score": 0.5}, "test": {"score": 0.5}, "seconds": {"total": 1.0}}
    monkeypatch.setattr(runner, "_run", lambda s: trained.append(s.key) or record)
    monkeypatch.setattr(quality, "write_json", lambda path, record: path.write_text("{}"))
    runner.runs_dir.mkdir(parents=True)
    claim = runner.claim_path(spec)
    claim.write_text(str(os.getppid()))  # a live process that is not this one
    assert runner.run(spec) is None and trained == []
    assert runner.claimed_elsewhere == {spec.key} and claim.exists()
    claim.write_text(str(_dead_pid()))  # its worker died mid-run
    assert runner.run(spec) is record and trained == [spec.key]
    assert not claim.exists() and runner.claimed_elsewhere == set()
    assert runner.path(spec).exists()


def test_a_failed_run_releases_its_claim(tmp_path, monkeypatch):
    runner = quality.Runner(quality.QUICK, tmp_path)
    spec = quality.RunSpec("rotten_tomatoes", "random", 0.05, 0, 1e-3)

    def broken(s):
        assert runner.claim_path(s).read_text() == str(os.getpid())  # held while training
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_run", broken)
    assert runner.run(spec) is None and "boom" in runner.failures[spec.key]
    assert not runner.claim_path(spec).exists() and not runner.path(spec).exists()


def test_pick_lr_asks_for_every_grid_point_even_when_one_is_missing():
    asked = []

    def score_of(lr):
        asked.append(lr)
        return None if lr == 1e-4 else 0.7

    assert quality.pick_lr([1e-4, 3e-4, 9e-4], score_of, extensions=2) is None
    assert asked == [1e-4, 3e-4, 9e-4]  # the other points still train in this pass


def test_sam_per_tensor_keeps_p_of_every_tensor_and_does_not_share_sams_cached_mask(tmp_path):
    runner = quality.Runner(quality.QUICK, tmp_path)
    masks = {}
    for method in ("sam", "sam_per_tensor"):
        spec = quality.RunSpec("rotten_tomatoes", method, 0.05, 0, 1e-3)
        masks[method] = quality.RECIPES[method].build(runner.context(spec), 1e-3).mask
    per_tensor, global_ = masks["sam_per_tensor"], masks["sam"]
    for name, row in per_tensor.per_parameter().items():
        if not row.always_train:
            assert row.selected == int(row.total * 0.05), name
    assert global_.digest() != per_tensor.digest()
    assert global_.num_selected == budget_size(global_.num_total, 0.05)


def test_a_choice_that_waited_on_another_workers_run_is_taken_up_before_the_seeds():
    class Shared:  # another worker holds one lr run during the first pass of selection
        protocol = quality.Protocol()

        def __init__(self):
            self.asked, self.held = [], {
                quality.RunSpec("rotten_tomatoes", "random", 0.005, 0, 0.01).key}

        def run(self, spec):
            self.asked.append(spec)
            if spec.key in self.held:
                self.held.discard(spec.key)  # ... and has finished it by the next ask
                return None
            return {"validation": {"score": 0.7 + spec.lr}}

    shared = Shared()
    plan = quality.Plan(tasks=["rotten_tomatoes", "trec"], methods=["random"], seeds=[0, 1],
                        lr_extensions=0, sweep=False)
    chosen = quality.execute(plan, shared, lambda: None)
    assert chosen["random"]["chosen"] == 0.03
    trained = {(s.task, s.seed, s.lr) for s in shared.asked}
    assert {("rotten_tomatoes", 1, 0.03), ("trec", 0, 0.03), ("trec", 1, 0.03)} <= trained


def test_a_run_that_failed_is_not_tried_again_by_the_same_worker(tmp_path, monkeypatch):
    runner = quality.Runner(quality.QUICK, tmp_path)
    spec = quality.RunSpec("rotten_tomatoes", "random", 0.05, 0, 1e-3)
    calls = []

    def broken(s):
        calls.append(s.key)
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_run", broken)
    assert runner.run(spec) is None and runner.run(spec) is None
    assert calls == [spec.key] and spec.key in runner.failures


def test_the_sweep_plot_draws_points_without_a_bound(tmp_path):
    """Densities with no E3 bound (denominator <= 0) beside ones with a bound: a PNG is written."""
    pytest.importorskip("matplotlib")

    def cell(mean):
        return {"mean": mean, "std": 0.01, "n": 3, "values": [mean] * 3}

    rows = []
    for method in ("sam", "random"):
        for p, lambda_min in ((0.001, -1.7), (0.2, -27.8)):
            denominator = lambda_min + 2 * (1 - p)
            rows.append({
                "method": method, "density": p, "lr": 1e-3, "lr_at_grid_edge": False,
                "constants": {"rho": 2.4, "lambda_min": lambda_min},
                "bound": 2 * 2.4**2 / (denominator * 1600) if denominator > 0 else None,
                "loss_gap": cell(0.1), "test_score": cell(0.75),
            })
    summary = {"plan": {"sweep_methods": ["sam", "random"]},
               "sweep": {"rows": rows, "n_train": 1600}}
    path = quality.plot_sweep(summary, tmp_path / "sweep.png")
    assert path == tmp_path / "sweep.png" and path.stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp.png"))  # written through a temp file, then renamed


def test_sam_probe_scores_after_a_head_only_warm_up_and_trains_from_the_same_start(tmp_path):
    runner = quality.Runner(quality.QUICK, tmp_path)
    spec = quality.RunSpec("rotten_tomatoes", "sam_probe", 0.05, 0, 1e-3)
    ctx = runner.context(spec)
    start = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    setup = quality.RECIPES["sam_probe"].build(ctx, 1e-3)
    # The warm-up leaves the model as found: training starts from theta0 and the initial head.
    for n, p in setup.model.named_parameters():
        assert torch.equal(p, start[n]), n
    sam = quality.RECIPES["sam"].build(runner.context(dataclasses.replace(spec, method="sam")),
                                       1e-3).mask
    assert setup.mask.num_selected == sam.num_selected
    assert setup.mask.digest() != sam.digest()  # the trained head changes g
