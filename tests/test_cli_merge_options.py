"""``sparsetune delta merge --policy ties|dare --density P --seed S`` through the CLI entry point.

The merged file must equal :func:`sparsetune.merge_deltas` with the same arguments exactly; a
density outside (0, 1], or a density/seed the policy does not use, is one line, exit 2, and no
file is written.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune.cli import main


def _deltas(tmp_path) -> list:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        mask = st.Mask.from_dict({n: torch.rand(p.shape, generator=g) < 0.5
                                  for n, p in base.named_parameters()})
        tuned = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
        tuned.load_state_dict(state)
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * mask[n])
        delta = st.SparseDelta.extract(tuned, state, mask)
        paths.append(str(delta.save(tmp_path / f"d{seed}.safetensors")))
    return paths


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


def _same(a: st.SparseDelta, b: st.SparseDelta) -> bool:
    return list(a.entries) == list(b.entries) and all(
        _same_index(a.entries[n].index, b.entries[n].index)
        and torch.equal(a.entries[n].tuned, b.entries[n].tuned)
        and torch.equal(a.entries[n].base, b.entries[n].base) for n in a.entries)


def _merge(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["delta", "merge", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("policy", "options", "kwargs"), [
    ("ties", ["--density", "0.3"], {"density": 0.3}),
    ("ties", [], {}),
    ("dare", ["--density", "0.5", "--seed", "7"], {"density": 0.5, "seed": 7}),
    ("dare", ["--seed", "7"], {"seed": 7}),
    ("dare", [], {}),
])
def test_merge_passes_density_and_seed_to_merge_deltas(tmp_path, capsys, policy, options, kwargs):
    paths = _deltas(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, err = _merge(capsys, *paths, "-o", str(out), "--policy", policy, *options)
    assert code == 0, err
    expected = st.merge_deltas([st.SparseDelta.load(p) for p in paths], policy=policy, **kwargs)
    assert _same(st.SparseDelta.load(out), expected)


def test_density_and_seed_change_the_result(tmp_path, capsys):
    paths = _deltas(tmp_path)
    merged = {}
    for options in (["--seed", "1"], ["--seed", "2"], ["--density", "0.9", "--seed", "1"]):
        out = tmp_path / f"{'_'.join(options)}.safetensors"
        code, err = _merge(capsys, *paths, "-o", str(out), "--policy", "dare", *options)
        assert code == 0, err
        merged[tuple(options)] = st.SparseDelta.load(out)
    first, *others = merged.values()
    assert not any(_same(first, other) for other in others)


@pytest.mark.parametrize(("options", "message"), [
    (["--policy", "sum", "--density", "0.5"],
     "policy='sum' does not use density=0.5: density is for 'ties' and 'dare', seed for "
     "'dare' only"),
    (["--policy", "mean", "--seed", "3"], "policy='mean' does not use seed=3"),
    (["--density", "0.5", "--seed", "3"], "does not use density=0.5 or seed=3"),
    (["--policy", "ties", "--seed", "3"], "policy='ties' does not use seed=3"),
    (["--policy", "dare", "--density", "0"], "density must be in (0, 1], got 0.0"),
    (["--policy", "ties", "--density", "1.5"], "density must be in (0, 1], got 1.5"),
    (["--policy", "dare", "--density", "nan"], "density must be in (0, 1], got nan"),
])
def test_bad_density_or_seed_is_one_line_and_writes_nothing(tmp_path, capsys, options, message):
    paths = _deltas(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, err = _merge(capsys, *paths, "-o", str(out), *options)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("sparsetune delta: error: ") and message in err, err
    assert not out.exists()


def test_the_installed_entry_point_exits_2(tmp_path):
    paths = _deltas(tmp_path)
    out = tmp_path / "merged.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "sparsetune.cli", "delta", "merge", *paths, "-o", str(out),
         "--policy", "sum", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "policy='sum' does not use seed=1" in done.stderr and not out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "sparsetune.cli", "delta", "merge", *paths, "-o", str(out),
         "--policy", "ties", "--density", "0.4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = st.merge_deltas([st.SparseDelta.load(p) for p in paths], policy="ties",
                               density=0.4)
    assert _same(st.SparseDelta.load(out), expected)
