"""The console script, run as a user would: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import sparsetune as st
from sparsetune.files import describe_file, read_metadata
from sparsetune.select import select_for_task
from sparsetune.workflows import extract_from_pretrained


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsetune.cli", *args], capture_output=True, text=True,
        timeout=120,
    )


def test_info_describes_mask_and_delta_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.Linear(10, 2))
    mask = st.select(model, "random", 0.1, seed=0, always_train=["1.bias"])
    mask_path = mask.save(tmp_path / "mask.safetensors", method="random")
    out = _run("info", str(mask_path))
    assert out.returncode == 0, out.stderr
    assert "sparsetune mask" in out.stdout and "'random'" in out.stdout
    assert "0.weight" in out.stdout and f"{mask.num_selected} of {mask.num_total}" in out.stdout

    tuned = copy.deepcopy(model)
    opt = st.SparseAdamW(tuned, mask, lr=0.1)
    tuned(torch.randn(3, 20)).sum().backward()
    opt.step()
    delta = st.SparseDelta.extract(tuned, model.state_dict(), mask, method="random")
    out = _run("info", str(delta.save(tmp_path / "delta.safetensors")))
    assert out.returncode == 0, out.stderr
    assert "sparsetune delta" in out.stdout and f"{delta.num_entries:,} entries" in out.stdout


def test_bad_files_exit_2_with_one_line(tmp_path):
    missing = _run("info", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "nope.safetensors" in missing.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    bad = _run("info", str(junk))
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_info_into_a_pipe_closed_early_exits_quietly(tmp_path):
    """``sparsetune info FILE | head -5``: no BrokenPipeError traceback, whenever it closes."""
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(1500)])  # ~200 kB out
    path = st.Mask.full(model).save(tmp_path / "mask.safetensors")
    for lines in (0, 5):
        child = subprocess.Popen([sys.executable, "-m", "sparsetune.cli", "info", str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(lines):
            assert child.stdout.readline()
        child.stdout.close()
        err = child.stderr.read().decode()
        assert child.wait(timeout=120) == 1 and err == "", err


def test_a_directory_or_a_device_as_a_file_is_one_line(tmp_path):
    for path in (tmp_path, "/dev/null"):
        for args in (["info", str(path)], ["delta", "merge", str(path), "-o", "x"]):
            out = _run(*args)
            assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
            assert f"{path} is not a regular file" in out.stderr


def test_help_and_version():
    out = _run("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout
    assert _run("--version").stdout.startswith("sparsetune ")


# -- mask and delta commands --------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT classifier folder (the MiniLM tokenizer), a CSV data set, a mask of it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparsetune.data import load_pretrained

    root = tmp_path_factory.mktemp("cli")
    _, tokenizer = load_pretrained(None)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, max_position_embeddings=64,
                        num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    assert AutoTokenizer.from_pretrained(root / "base") is not None
    rows = ["text,label"] + [f"{w} film number {i},{int(w == 'great')}"
                             for i, w in enumerate(["great", "awful"] * 20)]
    (root / "reviews.csv").write_text("\n".join(rows) + "\n")
    return root


def _tune(folder, out, mask, seed):
    """A 'fine-tuned' copy of the base folder that moved exactly on the mask's entries."""
    from sparsetune.data import load_pretrained

    model, _ = load_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * mask[n])
    model.save_pretrained(out)
    return model


def test_mask_command_writes_the_mask_select_for_task_gives(folders):
    out = folders / "sam.safetensors"
    args = ["mask", "--method", "sam", "--density", "0.01", "--model", str(folders / "base"),
            "--data", f"csv:{folders / 'reviews.csv'}", "--num-batches", "2", "--batch-size",
            "4", "--seed", "3", "-o", str(out), "--no-progress"]
    done = _run(*args)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout and "num_selected=2453, num_total=245392" in done.stdout
    mask, model = select_for_task(
        "sam", 0.01, model=folders / "base", data=f"csv:{folders / 'reviews.csv'}",
        num_batches=2, batch_size=4, seed=3, progress=False,
    )
    assert st.Mask.load(out, model=model) == mask
    assert mask.always_train == {"classifier.weight", "classifier.bias"}
    described = describe_file(out)
    assert "method 'sam', options {" in described
    assert "made for BertForSequenceClassification" in described
    options = json.loads(read_metadata(out, "mask")["options"])
    assert options["density"] == 0.01 and options["num_batches"] == 2 and options["seed"] == 3
    assert options["model"] == str(folders / "base") and options["batch_size"] == 4
    assert "progress" not in options


def _main(capsys, *args):
    from sparsetune.cli import main

    capsys.readouterr()  # only what this command prints
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mask_command_options_and_bad_input(folders, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    base = str(folders / "base")
    code, text, _ = _main(capsys, "mask", "--method", "names", "--model", base, "-o", str(out),
                          "-O", r"include=layer\.0\.attention", "--always-train")
    assert code == 0 and "always_train=[]" in text
    mask = st.Mask.load(out)
    assert mask["bert.encoder.layer.0.attention.self.query.weight"].all()
    assert not mask["classifier.weight"].any()
    out.unlink()
    csv = f"csv:{folders / 'reviews.csv'}"
    bad = [
        (["--method", "loar", "--density", "0.1"], "unknown method 'loar'; valid methods: ["),
        (["--method", "random", "--density", "1.5"], "density must be in (0, 1]"),
        (["--method", "sam", "--density", "0.1"], "is data-driven: give data"),
        (["--method", "random", "--density", "0.1", "--num-batches", "3"], "reads no batches"),
        (["--method", "sam", "--density", "0.1", "--data", "imdb"], "unknown data='imdb'"),
        (["--method", "sam", "--density", "0.1", "--data", "csv:/nope.csv"], "does not exist"),
        (["--method", "mixout", "--density", "0.1"], "sparsetune.optim.Mixout"),
        (["--method", "random", "--density", "0.1", "-O", "steps=3"], "does not take options"),
        (["--method", "sam", "--density", "0.1", "--data", csv, "--model", str(tmp_path)],
         "not a local transformers model folder"),
    ]
    for extra, message in bad:
        code, _, err = _main(capsys, "mask", *extra, "--model", base, "-o", str(out)) if (
            "--model" not in extra) else _main(capsys, "mask", *extra, "-o", str(out))
        assert code == 2, extra
        assert message in err and err.count("\n") == 1, (extra, err)
        assert not out.exists(), extra


def test_delta_extract_apply_merge_round_trip(folders, tmp_path, capsys):
    from sparsetune.data import load_pretrained

    base_model, _ = load_pretrained(folders / "base")
    head = ["classifier.weight", "classifier.bias"]
    masks = []
    for seed in (1, 2):
        mask = st.select(base_model, "random", 0.05, seed=seed, always_train=head)
        masks.append(mask.save(tmp_path / f"mask{seed}.safetensors", model=base_model))
    tuned = _tune(folders / "base", tmp_path / "tuned1", st.Mask.load(masks[0]), seed=5)
    done = _run("delta", "extract", "--base", str(folders / "base"), "--tuned",
                str(tmp_path / "tuned1"), "--mask", str(masks[0]), "-o",
                str(tmp_path / "d1.safetensors"))
    assert done.returncode == 0, done.stderr
    done = _run("delta", "apply", "--base", str(folders / "base"), "--delta",
                str(tmp_path / "d1.safetensors"), "-o", str(tmp_path / "applied"))
    assert done.returncode == 0, done.stderr
    applied, tokenizer = load_pretrained(tmp_path / "applied")
    assert tokenizer is not None  # the base's tokenizer travels with the model
    for (n, p), q in zip(tuned.named_parameters(), applied.parameters()):
        assert torch.equal(p, q), n  # bit for bit
    # a second task on the same base, merged with the first: the changes add up
    _tune(folders / "base", tmp_path / "tuned2", st.Mask.load(masks[1]), seed=6)
    d2 = extract_from_pretrained(folders / "base", tmp_path / "tuned2", masks[1])
    d2.save(tmp_path / "d2.safetensors")
    code, _, err = _main(capsys, "delta", "merge", str(tmp_path / "d1.safetensors"),
                         str(tmp_path / "d2.safetensors"), "-o", str(tmp_path / "sum.safetensors"))
    assert code == 0, err
    merged = st.SparseDelta.load(tmp_path / "sum.safetensors").to_dense()
    d1 = st.SparseDelta.load(tmp_path / "d1.safetensors").to_dense()
    for n in merged:
        expected = d1.get(n, 0) + d2.to_dense().get(n, 0)
        torch.testing.assert_close(merged[n], expected, rtol=0, atol=1e-6)


def test_delta_commands_refuse_bad_input_and_write_nothing(folders, tmp_path, capsys):
    from sparsetune.data import load_pretrained

    base = folders / "base"
    base_model, _ = load_pretrained(base)
    mask = st.select(base_model, "random", 0.05, always_train=["classifier.weight"])
    mask_path = mask.save(tmp_path / "mask.safetensors", model=base_model)
    _tune(base, tmp_path / "tuned", mask, seed=1)
    delta = extract_from_pretrained(base, tmp_path / "tuned", mask_path)
    delta_path = delta.save(tmp_path / "d.safetensors")
    out = tmp_path / "out"
    # another base: the MiniLM folder is not the base this delta came from
    code, _, err = _main(capsys, "delta", "apply", "--delta", str(delta_path), "-o", str(out))
    assert code == 2 and "delta does not fit the model" in err and err.count("\n") == 1
    other = tmp_path / "other"
    moved, _ = load_pretrained(base)
    with torch.no_grad():
        moved.bert.pooler.dense.bias.add_(1.0)
    moved.save_pretrained(other)
    code, _, err = _main(capsys, "delta", "apply", "--base", str(other), "--delta",
                         str(delta_path), "-o", str(out))
    assert code == 2 and "extracted from another base model" in err
    assert not out.exists()
    # a delta file given as a mask, a junk file, a tuned model that moved outside the mask
    code, _, err = _main(capsys, "delta", "extract", "--base", str(base), "--tuned",
                         str(tmp_path / "tuned"), "--mask", str(delta_path), "-o",
                         str(tmp_path / "x.safetensors"))
    assert code == 2 and "expected a sparsetune mask file, found kind='delta'" in err
    code, _, err = _main(capsys, "delta", "extract", "--base", str(base), "--tuned",
                         str(other), "--mask", str(mask_path), "-o",
                         str(tmp_path / "x.safetensors"))
    assert code == 2 and "differs from the base outside the mask" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    code, _, err = _main(capsys, "delta", "merge", str(delta_path), str(junk), "-o",
                         str(tmp_path / "x.safetensors"))
    assert code == 2 and "not a readable safetensors file" in err
    assert not (tmp_path / "x.safetensors").exists()
    # an existing output folder is never overwritten
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _main(capsys, "delta", "apply", "--base", str(base), "--delta",
                         str(delta_path), "-o", str(out))
    assert code == 2 and "already exists and is not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_help_of_every_new_command(capsys):
    from sparsetune.cli import main

    for args in (["mask"], ["delta"], ["delta", "extract"], ["delta", "apply"],
                 ["delta", "merge"]):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--help"])
        assert exit_.value.code == 0
        assert "usage: sparsetune " + " ".join(args) in capsys.readouterr().out


@pytest.mark.slow
def test_mask_command_on_the_real_minilm(tmp_path):
    out = tmp_path / "sam.safetensors"
    done = _run("mask", "--method", "sam", "--density", "0.005", "--data", "rotten_tomatoes",
                "--num-batches", "2", "-o", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    from sparsetune.data import load_model

    model, _ = load_model(2)
    mask = st.Mask.load(out, model=model)
    assert mask.num_selected == st.budget_size(mask.num_total, 0.005)
    assert mask.num_total == 22_713_216 and mask.always_train == {"classifier.weight",
                                                                   "classifier.bias"}


def test_mask_command_targets_place_the_budget_on_matching_parameters(folders, capsys, tmp_path):
    out = tmp_path / "qv.safetensors"
    base = str(folders / "base")
    patterns = [r"query\.weight$", r"value\.weight$"]
    code, _, err = _main(capsys, "mask", "--method", "random", "--density", "0.0002",
                         "--model", base, "--targets", *patterns, "-o", str(out))
    assert code == 0, err
    mask = st.Mask.load(out)
    expected, _ = select_for_task("random", 0.0002, model=base, targets=patterns, progress=False)
    assert mask == expected
    touched = [n for n, t in mask.items() if t.any() and n not in mask.always_train]
    assert touched and all(n.endswith(("query.weight", "value.weight")) for n in touched)
    code, _, err = _main(capsys, "mask", "--method", "random", "--density", "0.0002", "--model",
                         base, "--targets", "nothing_like_this", "-o", str(tmp_path / "x"))
    assert code == 2 and "matches no trainable parameter" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_usage_errors_are_one_line_naming_the_command():
    missing = _run("mask", "--density", "0.1")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("sparsetune mask: error: the following arguments are "
                                     "required: --method")
    assert "sparsetune mask --help" in missing.stderr
    unknown = _run("frobnicate")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "invalid choice: 'frobnicate'" in unknown.stderr
