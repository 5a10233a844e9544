"""Loading users' data and model folders for offline selection (what `sparsetune mask` runs)."""

from __future__ import annotations

import pytest
import torch

import sparsetune as st
from sparsetune.data import load_csv_task, load_model, load_pretrained, save_pretrained
from sparsetune.select import load_task_spec, select_for_task


def _csv(path, rows, header="text,label"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_task_labels_splits_and_errors(tmp_path):
    rows = [f"text {i},{[10, 2, -1][i % 3]}" for i in range(60)]
    task = load_csv_task(_csv(tmp_path / "t.csv", rows), seed=1)
    assert task.label_names == ("-1", "2", "10")  # integers in numeric order
    assert task.num_labels == 3 and task.metric == "accuracy" and task.name == "t"
    texts = task.train.texts + task.validation.texts + task.test.texts
    assert sorted(texts) == sorted(f"text {i}" for i in range(60))  # disjoint, complete
    assert (len(task.test), len(task.validation)) == (12, 6)  # 20% and 10% of each class
    for split in (task.train, task.test):
        for text, label in zip(split.texts, split.labels):
            assert task.label_names[label] == str([10, 2, -1][int(text.split()[1]) % 3])
    again = load_task_spec(f"csv:{tmp_path / 't.csv'}", seed=1)
    assert again == task
    with pytest.raises(st.InvalidArgumentError, match=r"missing \['label'\]; found columns"):
        load_csv_task(_csv(tmp_path / "a.csv", ["x,1"], header="text,y"))
    with pytest.raises(st.InvalidArgumentError, match="at least 2 labels"):
        load_csv_task(_csv(tmp_path / "b.csv", ["x,1", "y,1"]))
    with pytest.raises(st.InvalidArgumentError, match="line 3: empty text"):
        load_csv_task(_csv(tmp_path / "c.csv", ["x,1", ",0"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_csv_task(tmp_path / "none.csv")


def test_embedded_folder_loads_as_load_model_and_saves_atomically(tmp_path):
    a, _ = load_model(2, seed=4)
    b, tokenizer = load_pretrained(None, num_labels=2, seed=4)
    assert type(b).__name__ == "BertForSequenceClassification" and tokenizer is not None
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n  # the head too: the same seeded draw
    out = save_pretrained(b, tmp_path / "copy", tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary left
    c, _ = load_pretrained(out)  # its own architecture, head included
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters()))
    with pytest.raises(st.InvalidArgumentError, match="already exists and is not empty"):
        save_pretrained(b, out)
    with pytest.raises(st.InvalidArgumentError, match="not a transformers model class"):
        load_pretrained(out, architecture="NoSuchModel")


def test_select_for_task_checks_before_loading_anything():
    with pytest.raises(st.InvalidArgumentError, match="density"):
        select_for_task("random", 0.0)
    with pytest.raises(st.InvalidArgumentError, match="data-driven"):
        select_for_task("child_pruning", 0.1)
    with pytest.raises(st.InvalidArgumentError, match="unknown data"):
        load_task_spec("glue")
