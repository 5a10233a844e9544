"""Fault injection on every file sparsetune writes (issue 20, "Lost or half-written files").

A writer killed mid-save leaves the target old-or-new and, after the next save, no temporary
file; a write that fails (disk full, no permission, a path under a regular file, a directory or
a device as the target) is one :class:`FileWriteError` naming the target, with nothing left
behind; the CLI checks its output paths before any expensive work, then says so in one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsetune as st
from sparsetune.files import FileWriteError, atomic_write, check_writable

CHILD = r"""
import sys, torch
import sparsetune as st

target = sys.argv[1]
base = torch.nn.Linear(2048, 2048, bias=False)  # 4M entries: a 32 MB delta file
with torch.no_grad():
    base.weight.zero_()
mask = st.Mask.full(base)
deltas = []
for step in (1.0, 2.0):
    tuned = torch.nn.Linear(2048, 2048, bias=False)
    with torch.no_grad():
        tuned.weight.fill_(step)
    deltas.append(st.SparseDelta.extract(tuned, base.state_dict(), mask))
print("ready", flush=True)
sys.stdin.readline()  # go
i = 0
while True:
    deltas[i % 2].save(target)
    print("saved", flush=True)
    i += 1
"""


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _step_of(path: Path) -> float:
    """The constant change a complete delta file written by CHILD holds (1 or 2)."""
    dense = st.SparseDelta.load(path).to_dense()["weight"]
    assert dense.shape == (2048, 2048)
    values = torch.unique(dense)
    assert values.numel() == 1, values
    return float(values)


def test_writers_killed_mid_save_leave_the_target_whole_and_no_temporary_file(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "delta.safetensors"
    # start every child at once: their imports overlap; each waits for "go"
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(target)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    rng = random.Random(0)
    left_behind = 0
    try:
        for child in children:
            assert child.stdout.readline() == "ready\n"
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "saved\n"
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
            assert child.returncode == -signal.SIGKILL
            assert _step_of(target) in (1.0, 2.0)  # the old file or the new one, complete
            left_behind += bool(_hidden(folder))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert left_behind, "no kill landed mid-write: the test did not exercise anything"
    # the next save removes what the killed writers left (they hold no lock any more)
    model = torch.nn.Linear(3, 2)
    tuned = torch.nn.Linear(3, 2)
    st.SparseDelta.extract(tuned, model.state_dict(), st.Mask.full(model)).save(target)
    assert sorted(p.name for p in folder.iterdir()) == ["delta.safetensors"]
    assert st.SparseDelta.load(target).num_entries == 8


def test_stale_temporary_files_are_removed_only_when_no_writer_holds_them(tmp_path):
    target = tmp_path / "mask.safetensors"
    dead = tmp_path / ".mask.safetensors.0123abcd.sparsetune.tmp"  # its writer died
    live = tmp_path / ".mask.safetensors.89abcdef.sparsetune.tmp"  # a writer still at work
    other = tmp_path / ".other.safetensors.0123abcd.sparsetune.tmp"  # another target's
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    held = os.open(live, os.O_WRONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        st.Mask.full(torch.nn.Linear(2, 2)).save(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [target.name, live.name, other.name])
    finally:
        os.close(held)
    st.Mask.full(torch.nn.Linear(2, 2)).save(target)  # now nobody holds it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, other.name])


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind", ["mask", "delta", "subspace", "json"])
def test_a_full_disk_is_one_error_naming_the_target_and_leaves_the_old_file(tmp_path, kind,
                                                                            monkeypatch):
    model = torch.nn.Linear(4, 3)
    mask = st.select(model, "random", 0.5, seed=0)
    deltas = [st.SparseDelta.extract(torch.nn.Linear(4, 3), model.state_dict(),
                                     st.Mask.full(model)) for _ in range(2)]
    target = tmp_path / f"{kind}.out"

    def save():
        if kind == "mask":
            return mask.save(target)
        if kind == "delta":
            return deltas[0].save(target)
        if kind == "subspace":
            from sparsetune.subspace import fit

            return fit(deltas, 1).save(target)
        return atomic_write(target, lambda tmp: _no_space() if failing else Path(tmp).write_text(
            "{}\n"))

    failing = False
    save()
    before = target.read_bytes()
    failing = True
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", _no_space)
        with pytest.raises(FileWriteError) as caught:
            save()
    message = str(caught.value)
    assert message == f"cannot write {target}: No space left on device"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_unwritable_targets_are_refused_before_anything_is_written(tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("not a folder")
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    mask = st.Mask.full(torch.nn.Linear(2, 2))
    cases = {
        regular / "mask.safetensors": f"{regular} is not a directory",
        regular / "sub" / "mask.safetensors": f"{regular} is not a directory",
        tmp_path / "adir": "it is a directory",
        tmp_path / "fifo": "it exists and is not a regular file",
    }
    for target, reason in cases.items():
        with pytest.raises(FileWriteError) as caught:
            mask.save(target)
        assert str(caught.value) == f"cannot write {target}: {reason}"
    with pytest.raises(FileWriteError, match="exists and is not a directory"):
        check_writable(regular, folder=True)
    check_writable(None, tmp_path / "new" / "deeper" / "m.safetensors")  # mkdir'd on save
    check_writable(tmp_path, tmp_path / "new", folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "fifo", "file.txt"]
    assert not any((tmp_path / "adir").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(FileWriteError, match="permission denied"):
            st.Mask.full(torch.nn.Linear(2, 2)).save(folder / "m.safetensors")
        assert not any(folder.iterdir())
    finally:
        folder.chmod(0o755)


def _refuses(capsys, argv, target):
    from sparsetune.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and f"cannot write {target}" in err, err
    return err


def _never(*args, **kwargs):
    raise AssertionError("the expensive work ran before the output path was checked")


def test_commands_check_their_outputs_before_the_expensive_work(tmp_path, capsys, monkeypatch):
    import sparsetune.demo
    import sparsetune.workflows
    import sparsetune.workflows.deltas
    import sparsetune.workflows.masks
    import sparsetune.workflows.subspace

    regular = tmp_path / "file.txt"
    regular.write_text("not a folder")
    bad = regular / "out.safetensors"
    model = torch.nn.Linear(2, 2)
    delta = st.SparseDelta.extract(torch.nn.Linear(2, 2), model.state_dict(), st.Mask.full(model))
    d1 = str(delta.save(tmp_path / "d1.safetensors"))
    monkeypatch.setattr(sparsetune.workflows.masks, "select_for_task", _never)
    monkeypatch.setattr(sparsetune.workflows.deltas, "load_pretrained", _never)
    monkeypatch.setattr(sparsetune.workflows.deltas, "merge_deltas", _never)
    monkeypatch.setattr(sparsetune.workflows.subspace, "fit", _never)
    monkeypatch.setattr(sparsetune.workflows.subspace, "_setup", _never)
    monkeypatch.setattr(sparsetune.workflows, "diagnose_for_task", _never)
    monkeypatch.setattr(sparsetune.demo, "run_real_demo", _never)
    _refuses(capsys, ["mask", "--method", "random", "--density", "0.1", "-o", str(bad)], bad)
    _refuses(capsys, ["delta", "extract", "--tuned", "t", "--mask", "m", "-o", str(bad)], bad)
    _refuses(capsys, ["delta", "merge", d1, d1, "-o", str(bad)], bad)
    _refuses(capsys, ["delta", "apply", "--delta", d1, "-o", str(bad)], bad)
    _refuses(capsys, ["subspace", "fit", d1, d1, "--dim", "1", "--output", str(bad)], bad)
    _refuses(capsys, ["subspace", "train", "s", "--output", str(bad)], bad)
    _refuses(capsys, ["subspace", "landscape", "s", "--output", str(bad)], bad)
    _refuses(capsys, ["bound", "--data", "x", "--mask", "m", "--json", str(bad)], bad)
    _refuses(capsys, ["demo", "--output-dir", str(regular)], regular)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1.safetensors", "file.txt"]


def test_a_full_disk_in_the_cli_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    model = torch.nn.Linear(2, 2)
    delta = st.SparseDelta.extract(torch.nn.Linear(2, 2), model.state_dict(), st.Mask.full(model))
    d1 = str(delta.save(tmp_path / "d1.safetensors"))
    target = tmp_path / "merged.safetensors"
    monkeypatch.setattr(os, "write", _no_space)
    err = _refuses(capsys, ["delta", "merge", d1, d1, "-o", str(target)], target)
    monkeypatch.undo()
    assert err.endswith(f"cannot write {target}: No space left on device\n")
    assert "Traceback" not in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1.safetensors"]
