"""The real-model demo (embedded MiniLM, Rotten Tomatoes) end to end in a tiny configuration.

One tiny run (a few seconds of training) is shared by the tests below: its SAM run leaves every
frozen entry bit-identical to a freshly loaded base, and the files it writes (mask, delta, plot)
load back and reproduce it. The command line is run as a user would, in a subprocess.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import sparsetune as st
from sparsetune import data
from sparsetune.demo import FULL_FINE_TUNING, run_real_demo
from sparsetune.files import read_metadata

TINY = dict(
    task="rotten_tomatoes",
    method="sam",
    density=0.005,
    steps=4,
    batch_size=8,
    max_length=32,
    seed=0,
    select_batches=3,
    validation_examples=16,
    test_examples=32,
    max_examples=96,  # 67 training, 10 validation, 19 test examples
    progress=False,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_real_demo(output_dir=out, **TINY)
    return result, result.report()


@pytest.fixture(scope="module")
def base():
    """A freshly loaded base model (never modified: tests take copies)."""
    return data.load_model(2, seed=0)[0]


def test_sam_run_moves_only_its_mask(run, base):
    result, _ = run
    mask = result.mask
    tuned = dict(result.model.named_parameters())
    moved = 0
    for name, p in base.named_parameters():
        frozen = ~mask[name]
        assert torch.equal(tuned[name].detach()[frozen], p.detach()[frozen]), name
        moved += int((tuned[name].detach() != p.detach()).sum())
    assert 0 < moved <= mask.num_trainable
    assert all(r.frozen_entries_unchanged for r in result.rows[:2])


def test_mask_file_has_the_requested_budget(run, base):
    result, _ = run
    loaded = st.Mask.load(result.files["mask"], model=base)
    assert loaded == result.mask
    assert loaded.num_selected == st.budget_size(loaded.num_total, TINY["density"])
    assert loaded.always_train == frozenset(data.HEAD_PARAMETERS)
    assert read_metadata(result.files["mask"], "mask")["method"] == "sam"


def test_delta_file_turns_a_fresh_base_into_the_tuned_model(run, base):
    result, _ = run
    model = copy.deepcopy(base)
    st.SparseDelta.load(result.files["delta"]).apply_to(model)
    tuned = dict(result.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, tuned[name]), name


def test_plot_is_a_png(run):
    result, _ = run
    head = result.files["plot"].read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and result.files["plot"].stat().st_size > 10_000


def test_report_compares_every_method_on_the_same_budget(run):
    result, report = run
    labels = [r.method for r in result.rows]
    assert labels == ["sam p=0.005", "random p=0.005", FULL_FINE_TUNING]
    assert all(label in report for label in labels)
    assert "SparseAdamW" in report and "torch.optim.AdamW" in report
    sam, rand, full = result.rows
    assert sam.trained_entries == rand.trained_entries < full.trained_entries / 100
    assert sam.optimizer_state_bytes < full.optimizer_state_bytes / 20
    assert all(len(r.losses) == TINY["steps"] for r in result.rows)
    assert all(0 <= r.test_score <= 1 and 0 <= r.validation_score <= 1 for r in result.rows)
    assert (result.n_validation, result.n_test) == (10, 19)


def test_report_prints_the_stability_diagnostics_of_the_tuned_model(run):
    result, report = run
    from sparsetune.bounds import BoundReport

    assert isinstance(result.stability, BoundReport), result.stability
    constants = result.stability.constants
    assert constants.rho > 0 and constants.lambda_max >= constants.lambda_min
    assert "stability diagnostics of the sam-tuned model" in report
    assert str(result.stability) in report


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run(run, tmp_path):
    result, _ = run
    again = run_real_demo(output_dir=tmp_path, **TINY)
    assert again.mask == result.mask
    assert [r.losses for r in again.rows] == [r.losses for r in result.rows]
    assert [r.test_score for r in again.rows] == [r.test_score for r in result.rows]
    tuned = dict(result.model.named_parameters())
    assert all(torch.equal(p, tuned[n]) for n, p in again.model.named_parameters())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsetune.cli", *args], capture_output=True, text=True,
        timeout=120,
    )


def test_cli_demo_help_lists_the_flags():
    out = _cli("demo", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--task", "--method", "--density", "--steps", "--seed", "--output-dir",
                 "--no-progress"):
        assert flag in out.stdout
    assert all(task in out.stdout for task in data.TASKS) and "sam" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--task", "imdb"), "unknown task='imdb'; valid tasks: rotten_tomatoes"),
        (("--density", "0"), "density must be in (0, 1], got density=0.0"),
        (("--method", "child_tuning_f"), "method must be one of"),
    ],
)
def test_cli_demo_bad_input_exits_2_with_one_line(args, message, tmp_path):
    out = _cli("demo", "--output-dir", str(tmp_path / "out"), *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
