"""End-to-end demos: the embedded MiniLM on a real text task, and a small digits MLP.

:func:`run_real_demo` (``sparsetune demo``) is the paper's experiment in a few minutes on a CPU:
the embedded all-MiniLM-L6-v2 gets a fresh classification head and is fine-tuned on one of the
offline tasks of :mod:`sparsetune.data` three ways, on the same steps, batches and dropout
draws: with a selected mask (SAM by default), with a random mask of the same density and head,
and in full. It prints the scores, the trained entries, the optimizer state and the wall time
of each, and saves the mask, the sparse delta and a plot.

:func:`run_digits_demo` (``sparsetune demo-digits``) tells the same story in seconds on
scikit-learn's handwritten digits: a small MLP is *pretrained* on the digits 0-4, then
*fine-tuned* to tell apart the digits 5-9 from only a few labelled examples, with a fresh task
head that is always trained. We compare, at the same number of steps:

* head only (nothing of the body moves),
* a random mask of density p over the body,
* the SAM mask (paper's practical variant: largest squared accumulated gradient at theta0),
* full fine-tuning,

all trained with :class:`sparsetune.SparseAdamW` (full fine-tuning uses a full mask, which is
exactly AdamW).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data
from ._checks import check_density, check_int, check_positive
from ._loss import cycle
from .delta import SparseDelta
from .errors import InvalidArgumentError
from .mask import SCOPES, Mask
from .optim import SparseAdamW, optimizer_state_nbytes
from .select import METHODS, method_info, select

__all__ = [
    "DEFAULT_LRS",
    "FULL_FINE_TUNING",
    "REAL_DEMO_METHODS",
    "UNTUNED_LR",
    "DemoResult",
    "DemoRow",
    "RealDemoResult",
    "RealDemoRow",
    "run_digits_demo",
    "run_real_demo",
]

HEAD = ("head.weight", "head.bias")


@dataclass
class DemoRow:
    method: str
    trained_entries: int
    optimizer_state_bytes: int
    train_loss: float
    test_accuracy: float
    frozen_entries_unchanged: bool


@dataclass
class DemoResult:
    density: float
    steps: int
    n_train: int
    n_test: int
    pretrain_accuracy: float
    scope: str = "per_tensor"
    lr: float = 0.0
    rows: list[DemoRow] = field(default_factory=list)
    sam_mask_summary: str = ""
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"{'method':<22}{'trained entries':>16}{'state bytes':>13}"
            f"{'train loss':>12}{'test acc':>10}  frozen unchanged"
        ]
        for r in self.rows:
            lines.append(
                f"{r.method:<22}{r.trained_entries:>16,}{r.optimizer_state_bytes:>13,}"
                f"{r.train_loss:>12.4f}{r.test_accuracy:>10.3f}  {r.frozen_entries_unchanged}"
            )
        return "\n".join(lines)

    def report(self) -> str:
        return (
            f"sparsetune demo: digits (scikit-learn), MLP pretrained on 0-4 "
            f"(held-out accuracy {self.pretrain_accuracy:.3f}), fine-tuned on 5-9 with "
            f"{self.n_train} labelled examples, {self.steps} steps, density p = {self.density:g} "
            f"({self.scope}), lr {self.lr:g}, tested on {self.n_test}\n\n{self.table()}\n\n"
            f"SAM mask:\n{self.sam_mask_summary}\n"
            f"\n({self.seconds:.1f} s)"
        )


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Module:
    body = nn.Sequential(
        nn.Linear(n_in, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_hidden), nn.GELU()
    )
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(n_hidden, n_out)))


def _batches(x: Tensor, y: Tensor, size: int, gen: torch.Generator) -> Iterator[tuple]:
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - size + 1, size):
            idx = order[i : i + size]
            yield x[idx], y[idx]


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _train(model, mask, batches, steps, lr, weight_decay) -> float:
    opt = SparseAdamW(model, mask, lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, next(batches))
        loss.backward()
        opt.step()
    return float(loss.detach()), optimizer_state_nbytes(opt)


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits demo needs scikit-learn: pip install 'sparsetune[dev]' or `make demo`"
        ) from exc
    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def run_digits_demo(
    density: float = 0.02,
    steps: int = 300,
    n_train: int = 100,
    seed: int = 0,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    scope: str = "per_tensor",
) -> DemoResult:
    """Pretrain on digits 0-4, fine-tune on 5-9 with four masks; return the measured table.

    ``scope`` is the top-k scope of the random and SAM masks ("per_tensor", as the authors'
    code, or "global", as the paper's theorem). Every method gets the same steps and lr.
    """
    check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = _load_digits()

    # Pretraining: digits 0-4, 80% to train, 20% held out.
    old = y < 5
    xo, yo = x[old], y[old]
    order = torch.randperm(len(xo), generator=gen)
    cut = int(0.8 * len(xo))
    base = _mlp(64, 64, 5)
    _train(base, Mask.full(base), _batches(xo[order[:cut]], yo[order[:cut]], 64, gen), 400, 3e-3, 0)
    pretrain_acc = _accuracy(base, xo[order[cut:]], yo[order[cut:]])

    # Downstream: digits 5-9 relabelled 0-4, few labelled examples, the rest for testing.
    new = y >= 5
    xn, yn = x[new], y[new] - 5
    order = torch.randperm(len(xn), generator=gen)
    tr, te = order[:n_train], order[n_train:]
    result = DemoResult(density, steps, n_train, len(te), pretrain_acc, scope=scope, lr=lr)

    def fresh() -> nn.Module:
        model = _mlp(64, 64, 5)
        model.load_state_dict(base.state_dict())
        torch.manual_seed(seed + 1)
        model.head.reset_parameters()  # a new task head, the same for every method
        return model

    probe = fresh()
    sam_batches = _batches(xn[tr], yn[tr], 20, gen)
    masks = {
        "head only": Mask.empty(probe, always_train=HEAD),
        f"random p={density:g}": select(
            probe, "random", density, scope=scope, seed=seed, always_train=HEAD
        ),
        f"SAM p={density:g}": select(
            probe, "sam", density, data=sam_batches, loss_fn=_loss, num_batches=20,
            scope=scope, always_train=HEAD, progress=False,
        ),
        "full fine-tuning": Mask.full(probe, always_train=HEAD),
    }
    result.sam_mask_summary = masks[f"SAM p={density:g}"].summary()
    for method, mask in masks.items():
        model = fresh()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batches = _batches(xn[tr], yn[tr], 20, torch.Generator().manual_seed(seed + 2))
        loss, state_bytes = _train(model, mask, batches, steps, lr, weight_decay)
        unchanged = all(
            torch.equal(p.detach()[~mask[n]], before[n][~mask[n]])
            for n, p in model.named_parameters()
        )
        result.rows.append(
            DemoRow(
                method, mask.num_trainable, state_bytes, loss, _accuracy(model, xn[te], yn[te]),
                unchanged,
            )
        )
    result.seconds = time.perf_counter() - start
    return result


# =============================================================================================
# The real-model demo: the embedded MiniLM on an offline text-classification task

FULL_FINE_TUNING = "full fine-tuning"
#: Methods ``run_real_demo`` can select with: every registered method that gives one fixed mask
#: with no extra rules (``names`` needs regexes; ``child_tuning_f`` is an optimizer).
REAL_DEMO_METHODS: tuple[str, ...] = tuple(
    m for m in METHODS if method_info(m).family != "optimizer" and m != "names"
)
#: Default peak learning rate of each method (SparseAdamW on masks, torch.optim.AdamW in full):
#: the best validation accuracy of a grid, measured once on rotten_tomatoes with the defaults
#: (seed 0, 150 steps of 16, 500 validation examples; the test split was never read):
#:
#:   lr      2e-5  5e-5  1e-4  2e-4  5e-4  1e-3  2e-3  5e-3  1e-2  2e-2
#:   sam                             .728  .744  .742  .742  .560
#:   random                          .560  .560  .592  .748  .778  .754
#:   full    .594  .766  .760  .798  .560  .560
#:
#: The random mask wants a 10x larger rate than SAM: one common rate would favour the method
#: it suits. Other methods, never tuned, use :data:`UNTUNED_LR`.
DEFAULT_LRS: dict[str, float] = {"sam": 1e-3, "random": 1e-2, FULL_FINE_TUNING: 2e-4}
UNTUNED_LR = 2e-3
_EVAL_BATCH = 64
# Data-driven methods that train for `steps` burn-in steps rather than score `num_batches`.
_BURN_IN_METHODS = ("lt_sft", "diff_pruning")
_WARMUP = 0.1  # fraction of the steps with a linear warmup, then a linear decay to 0


@dataclass
class RealDemoRow:
    """One method of the real demo: its run with the best validation score over the lr grid."""

    method: str  # the row label: "sam p=0.005", "random p=0.005" or "full fine-tuning"
    optimizer: str  # "SparseAdamW" or "torch.optim.AdamW"
    lr: float  # the peak learning rate of this run
    trained_entries: int
    optimizer_state_bytes: int
    validation_score: float
    test_score: float
    select_seconds: float  # choosing the mask (0 for full fine-tuning)
    train_seconds: float  # the training steps of this run
    eval_seconds: float  # validation and test evaluation of this run
    losses: list[float] = field(default_factory=list, repr=False)  # training loss per step
    frozen_entries_unchanged: bool | None = None  # None for full fine-tuning: nothing is frozen
    validation_by_lr: dict[float, float] = field(default_factory=dict)  # every lr tried


@dataclass
class RealDemoResult:
    """What :func:`run_real_demo` measured; ``report()`` is what ``sparsetune demo`` prints."""

    task: str
    metric: str  # "accuracy", or "f1" (of the positive class) for sms_spam
    method: str
    density: float  # density of the selected mask's budgeted entries
    scope: str
    steps: int
    batch_size: int
    max_length: int
    seed: int
    n_train: int
    n_validation: int
    n_test: int
    select_batches: int
    majority_score: float  # the metric of always predicting the training split's majority class
    num_parameters: int
    head_entries: int
    lr_scales: tuple[float, ...] = (1.0,)
    rows: list[RealDemoRow] = field(default_factory=list)
    mask_summary: str = ""
    files: dict[str, Path] = field(default_factory=dict)  # "mask", "delta", "plot"
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)  # tuned with the selected mask
    mask: Mask | None = field(default=None, repr=False)
    # theory/ E3, E4 of the tuned model (bounds.BoundReport), or why it could not be computed
    stability: object = field(default=None, repr=False)

    def table(self) -> str:
        metric = "acc" if self.metric == "accuracy" else "F1"
        lines = [
            f"{'method':<18}{'optimizer':>19}{'lr':>8}{'trained entries':>17}"
            f"{'optim. state':>14}{'select s':>10}{'train s':>9}{'eval s':>8}"
            f"{'val ' + metric:>9}{'test ' + metric:>10}  frozen unchanged"
        ]
        for r in self.rows:
            frozen = "-" if r.frozen_entries_unchanged is None else str(r.frozen_entries_unchanged)
            lines.append(
                f"{r.method:<18}{r.optimizer:>19}{r.lr:>8.0e}{r.trained_entries:>17,}"
                f"{_megabytes(r.optimizer_state_bytes):>14}{r.select_seconds:>10.1f}"
                f"{r.train_seconds:>9.1f}{r.eval_seconds:>8.1f}{r.validation_score:>9.3f}"
                f"{r.test_score:>10.3f}  {frozen}"
            )
        return "\n".join(lines)

    def _selection_data(self) -> str:
        if not method_info(self.method).needs_data:
            return ""
        if self.method in _BURN_IN_METHODS:
            return f", after {self.select_batches} burn-in steps of batch {self.batch_size}"
        return (
            f", from {self.select_batches} batches of {self.batch_size} at theta0; "
            "the paper used 600"
        )

    def report(self) -> str:
        metric = "accuracy" if self.metric == "accuracy" else "F1 of the spam class"
        seen = self.steps * self.batch_size
        head = ", ".join(data.HEAD_PARAMETERS)
        defaults = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LRS.items())
        if self.method not in DEFAULT_LRS:
            defaults += f", {self.method} {UNTUNED_LR:g} (never tuned)"
        if self.lr_scales == (1.0,):
            lr_rule = (
                f"peak lr per method, the defaults ({defaults}): each the best of one grid on "
                "rotten_tomatoes' validation split (seed 0, 150 steps), not re-tuned for this "
                "run; --lr-scales 0.5 1 2 re-tunes every method on this run's validation split"
            )
        else:
            scales = ", ".join(f"{s:g}" for s in self.lr_scales)
            lr_rule = (
                f"peak lr per method: its default ({defaults}) times the best of {{{scales}}} "
                "on the validation split, the same rule for every method"
            )
        lines = [
            f"sparsetune demo: {self.task} ({metric}), the embedded all-MiniLM-L6-v2 "
            f"({self.num_parameters:,} parameters) with a fresh classification head "
            f"({head}: {self.head_entries:,} entries, trained by every method)",
            f"data: {self.n_train:,} training examples ({self.steps} steps x {self.batch_size} "
            f"= {seen:,} drawn, {min(seen / max(self.n_train, 1), 99):.2f} passes), "
            f"{self.n_validation:,} validation, {self.n_test:,} test, at most "
            f"{self.max_length} tokens; always predicting the majority class scores "
            f"{self.majority_score:.3f}",
            f"mask: {self.method} at density p = {self.density:.4g} ("
            + (f"{self.scope} top-k" if method_info(self.method).uses_density else "its rule")
            + self._selection_data()
            + ")"
            + ("" if self.method == "random" else "; the random mask has the same budget"),
            f"training: the same {self.steps} steps, batches and dropout draws (seed "
            f"{self.seed}) for every method; lr warmup over the first {_WARMUP:.0%} of the "
            "steps, then linear decay to 0; no weight decay, no clipping",
            f"learning rates: {lr_rule}",
            "",
            self.table(),
        ]
        if self.metric == "accuracy" and self.rows:
            best = max(r.test_score for r in self.rows)
            error = math.sqrt(best * (1 - best) / self.n_test)
            lines.append(
                f"(one standard error of a test accuracy near {best:.2f} on {self.n_test:,} "
                f"examples: {error:.3f}; smaller differences are noise)"
            )
        tried = [r for r in self.rows if len(r.validation_by_lr) > 1]
        if tried:
            lines += ["", "validation score by lr:"] + [
                f"  {r.method}: "
                + ", ".join(f"{lr:.0e} {s:.3f}" for lr, s in r.validation_by_lr.items())
                for r in tried
            ]
        lines += [
            "",
            f"{self.method} mask (largest parameters first):",
            self.mask_summary,
            "",
            "files:",
            f"  {self.files['mask']}  the {self.method} mask (sparsetune info FILE describes it)",
            f"  {self.files['delta']}  the {self.method} fine-tuned model as a sparse delta "
            "of the base (SparseDelta.load(FILE).apply_to(base) restores it)",
            f"  {self.files['plot']}  training loss per step and scores per method",
            "",
            *([] if self.stability is None else
              [f"stability diagnostics of the {self.method}-tuned model:", str(self.stability),
               ""]),
            f"total wall time {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 10e6 else f"{n / 1e6:.0f} MB"


def _first(split: data.Split, n: int) -> data.Split:
    """The first ``n`` examples of a split (its order is already seeded and random)."""
    return data.Split(split.texts[:n], split.labels[:n])


def _constant_score(labels: list[int], prediction: int, metric: str) -> float:
    """The metric of predicting ``prediction`` for every example."""
    hits = sum(label == prediction for label in labels)
    if metric == "accuracy":
        return hits / len(labels)
    positives = sum(label == 1 for label in labels)
    tp, fp = (positives, len(labels) - positives) if prediction == 1 else (0, 0)
    fn = positives - tp
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _warmup_then_decay(steps: int):
    warmup = max(1, round(_WARMUP * steps))

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _fine_tune(
    model: nn.Module,
    mask: Mask | None,
    batches: Iterable[dict[str, Tensor]],
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool,
) -> tuple[list[float], int]:
    """Train ``model`` in place (train mode, dropout on); ``mask=None`` is dense AdamW.

    Returns the loss of every step and the optimizer state bytes.
    """
    if mask is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    else:
        opt = SparseAdamW(model, mask, lr=lr, weight_decay=0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then_decay(steps))
    losses: list[float] = []
    stream = cycle(batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout draws for every method
        model.train()
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = model(**next(stream)).loss
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        model.eval()
    return losses, optimizer_state_nbytes(opt)


def _evaluate(model: nn.Module, batches: data.Batches, metric: str, desc: str, progress: bool):
    return data.evaluate(
        model, tqdm(batches, desc=desc, disable=not progress, leave=False), metric
    )


def _plot(result: RealDemoResult, path: Path) -> None:
    """Loss curves (raw and a moving average) and validation/test bars, written as a PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, bar_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for row, color in zip(result.rows, colors):
        loss = np.asarray(row.losses)
        window = max(1, min(20, len(loss) // 10))
        average = np.convolve(loss, np.ones(window) / window, mode="valid")
        steps = np.arange(1, len(loss) + 1)
        loss_ax.plot(steps, loss, color=color, alpha=0.2, linewidth=0.8)
        label = f"{row.method} (lr {row.lr:.0e})"
        loss_ax.plot(steps[window - 1 :], average, color=color, label=label)
    loss_ax.set(
        xlabel="step",
        ylabel="training loss (cross-entropy)",
        title=f"{result.task}: training loss (faint: per batch; bold: moving average)",
    )
    loss_ax.legend()
    x = np.arange(len(result.rows))
    width = 0.38
    for offset, label, scores in (
        (-width / 2, "validation", [r.validation_score for r in result.rows]),
        (width / 2, "test", [r.test_score for r in result.rows]),
    ):
        bars = bar_ax.bar(x + offset, scores, width, label=label)
        bar_ax.bar_label(bars, fmt="%.3f", fontsize=8)
    bar_ax.axhline(result.majority_score, color="grey", linestyle="--", label="majority class")
    bar_ax.set_xticks(x, [r.method for r in result.rows])
    title = f"{result.metric} after {result.steps} steps"
    bar_ax.set(ylim=(0, 1.15), ylabel=result.metric, title=title)
    bar_ax.legend(loc="upper center", ncols=3, fontsize="small")
    fig.savefig(path, dpi=100)


_BOUND_EXAMPLES = 4  # training examples the E3/E4 constants are measured on
_BOUND_MAX_LENGTH = 32  # tokens per example there: every Lanczos step is a pass over them


def _stability_diagnostics(model: nn.Module, mask: Mask, train: data.Split, tokenizer: object,
                           max_length: int, progress: bool) -> object:
    """``bounds.diagnose`` of the tuned model on its first training examples (Lanczos to 1%),
    with n = the training split; eager attention for the Hessian-vector products, then SDPA
    again. A Lanczos failure is reported as text rather than ending the demo."""
    from . import bounds
    from .errors import CurvatureError

    sample = _first(train, _BOUND_EXAMPLES)
    model.set_attn_implementation("eager")
    try:
        return bounds.diagnose(
            model, None, data.batches(sample, tokenizer, batch_size=len(sample),
                                      max_length=min(max_length, _BOUND_MAX_LENGTH)),
            mask, n=len(train), tol=1e-2, progress=progress,
        )
    except CurvatureError as e:
        return f"no diagnostics: {e}"
    finally:
        model.set_attn_implementation("sdpa")


def run_real_demo(
    task: str = "rotten_tomatoes",
    method: str = "sam",
    density: float = 0.005,
    steps: int = 150,
    batch_size: int = 16,
    max_length: int = 64,
    seed: int = 0,
    output_dir: str | Path = "demo_output",
    progress: bool = True,
    *,
    scope: str = "global",
    select_batches: int = 40,
    validation_examples: int = 500,
    test_examples: int = 1000,
    max_examples: int | None = None,
    lr_scales: Sequence[float] = (1.0,),
) -> RealDemoResult:
    """Fine-tune the embedded MiniLM on ``task`` with a ``method`` mask, a random mask and in full.

    1. ``data.load_task(task, seed=seed, max_examples=max_examples)``; the first
       ``validation_examples`` and ``test_examples`` of those splits are scored, and training
       batches are drawn from the whole training split (reshuffled at every pass).
    2. ``data.load_model(num_labels, seed=seed)`` (SDPA attention): the base, never modified.
    3. ``select(base, method, density, data=train batches, num_batches=select_batches,
       always_train=data.HEAD_PARAMETERS, scope=scope)`` with the default loss
       ``model(**batch).loss``; then a random mask with the same budget and head.
    4. Each method trains a fresh copy of the base for ``steps`` steps on the same batches and
       dropout draws, lr warmup (10%) then linear decay, no weight decay: the masks with
       :class:`SparseAdamW` and full fine-tuning with ``torch.optim.AdamW``, each at its peak
       lr in :data:`DEFAULT_LRS`. ``lr_scales`` (for example ``(0.5, 1, 2)``) trains
       each method once per scale of its default lr and keeps the run with the best validation
       score: the same rule for every method, and the test split is read only for that run.
    5. Writes ``mask.safetensors`` (the ``method`` mask), ``delta.safetensors`` (its fine-tuned
       model as a :class:`SparseDelta` of the base) and ``demo.png`` into ``output_dir``.

    With the defaults it takes under 3 minutes on 2 idle CPU cores (0.25 s per training step,
    0.33 s in full) and about 3 times as long when other work shares them.
    ``method`` is one of :data:`REAL_DEMO_METHODS`; ``bitfit`` ignores ``density`` (its density
    is what the rule gives). Deterministic for a ``seed`` on a given machine.
    """
    start = time.perf_counter()
    if task not in data.TASKS:
        raise InvalidArgumentError(f"unknown task={task!r}; valid tasks: {', '.join(data.TASKS)}")
    if method not in REAL_DEMO_METHODS:
        raise InvalidArgumentError(
            f"method must be one of {', '.join(REAL_DEMO_METHODS)} (a fixed mask), got "
            f"method={method!r}"
        )
    uses_density = method_info(method).uses_density
    if uses_density:
        check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got scope={scope!r}")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("max_length", max_length),
        ("select_batches", select_batches),
        ("validation_examples", validation_examples),
        ("test_examples", test_examples),
    ):
        check_int(name, value)
    check_int("seed", seed, minimum=0)
    scales = tuple(check_positive("lr_scales entry", s) for s in lr_scales)
    if not scales:
        raise InvalidArgumentError("lr_scales must hold at least one scale, got an empty one")
    if importlib.util.find_spec("matplotlib") is None:
        raise data.DataUnavailableError(
            "the demo plots with matplotlib, which is not installed; "
            "install it with `pip install 'sparsetune[plot]'`"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    task_data = data.load_task(task, seed=seed, max_examples=max_examples)
    train = task_data.train
    validation = _first(task_data.validation, validation_examples)
    test = _first(task_data.test, test_examples)
    for name, split in (("training", train), ("validation", validation), ("test", test)):
        if not len(split):
            raise InvalidArgumentError(
                f"the {name} split of {task!r} is empty (max_examples={max_examples!r}); "
                "pass a larger max_examples"
            )
    base, tokenizer = data.load_model(task_data.num_labels, seed=seed, attn_implementation="sdpa")
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}

    def batches_of(split: data.Split, shuffle: bool, batch: int, batches_seed: int = seed):
        return data.batches(
            split, tokenizer, batch_size=batch, max_length=max_length, shuffle=shuffle,
            seed=batches_seed,
        )

    majority = max(range(task_data.num_labels), key=train.labels.count)
    head = data.HEAD_PARAMETERS
    result = RealDemoResult(
        task=task,
        metric=task_data.metric,
        method=method,
        density=0.0,
        scope=scope,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        n_train=len(train),
        n_validation=len(validation),
        n_test=len(test),
        select_batches=min(select_batches, len(batches_of(train, True, batch_size))),
        majority_score=_constant_score(test.labels, majority, task_data.metric),
        num_parameters=sum(p.numel() for p in base.parameters()),
        head_entries=sum(base_state[n].numel() for n in head),
        lr_scales=scales,
    )

    # Masks: the method's, then a random one with the same budget (and the head in both).
    masks: dict[str, tuple[str, Mask | None, float]] = {}  # label -> (method, mask, seconds)
    tick = time.perf_counter()
    select_data = batches_of(train, True, batch_size, seed + 1)
    options: dict[str, object] = {}
    if method_info(method).needs_data:
        options = {"progress": progress}
        options["steps" if method in _BURN_IN_METHODS else "num_batches"] = select_batches
    mask = select(
        base, method, density if uses_density else None, data=select_data, scope=scope,
        seed=seed, always_train=head, **options,
    )
    result.density = mask.density
    label = f"{method} p={mask.density:.2g}"
    masks[label] = (method, mask, time.perf_counter() - tick)
    if method != "random":
        tick = time.perf_counter()
        p = density if uses_density else min(1.0, (mask.num_selected + 0.5) / mask.num_total)
        random_mask = select(base, "random", p, scope=scope, seed=seed, always_train=head)
        seconds = time.perf_counter() - tick
        masks[f"random p={random_mask.density:.2g}"] = ("random", random_mask, seconds)
    masks[FULL_FINE_TUNING] = (FULL_FINE_TUNING, None, 0.0)
    result.mask, result.mask_summary = mask, mask.summary(max_rows=8)

    val_batches = batches_of(validation, False, _EVAL_BATCH)
    test_batches = batches_of(test, False, _EVAL_BATCH)
    for row_label, (row_method, row_mask, select_seconds) in masks.items():
        default_lr = DEFAULT_LRS.get(row_method, UNTUNED_LR)
        best: tuple[float, float, nn.Module, list[float], int, float, float] | None = None
        by_lr: dict[float, float] = {}
        for scale in scales:
            lr = default_lr * scale
            model = copy.deepcopy(base)
            suffix = f" lr {lr:.0e}" if len(scales) > 1 else ""
            tick = time.perf_counter()
            losses, state_bytes = _fine_tune(
                model, row_mask, batches_of(train, True, batch_size), steps, lr, seed,
                f"fine-tuning {row_label}{suffix}", progress,
            )
            train_seconds = time.perf_counter() - tick
            tick = time.perf_counter()
            score = _evaluate(
                model, val_batches, task_data.metric, f"validating {row_label}{suffix}", progress
            )
            by_lr[lr] = score
            if best is None or score > best[0]:
                best = (score, lr, model, losses, state_bytes, train_seconds,
                        time.perf_counter() - tick)
        score, lr, model, losses, state_bytes, train_seconds, eval_seconds = best
        tick = time.perf_counter()
        test_score = _evaluate(
            model, test_batches, task_data.metric, f"testing {row_label}", progress
        )
        eval_seconds += time.perf_counter() - tick
        frozen = None
        if row_mask is not None:
            frozen = all(
                torch.equal(p.detach()[~row_mask[n]], base_state[n][~row_mask[n]])
                for n, p in model.named_parameters()
            )
        result.rows.append(
            RealDemoRow(
                method=row_label,
                optimizer="torch.optim.AdamW" if row_mask is None else "SparseAdamW",
                lr=lr,
                trained_entries=(
                    result.num_parameters if row_mask is None else row_mask.num_trainable
                ),
                optimizer_state_bytes=state_bytes,
                validation_score=score,
                test_score=test_score,
                select_seconds=select_seconds,
                train_seconds=train_seconds,
                eval_seconds=eval_seconds,
                losses=losses,
                frozen_entries_unchanged=frozen,
                validation_by_lr=by_lr,
            )
        )
        if row_mask is mask:
            result.model = model
            result.files["mask"] = mask.save(out / "mask.safetensors", method=method)
            delta = SparseDelta.extract(model, base_state, mask, method=method)
            result.files["delta"] = delta.save(out / "delta.safetensors")
        del model, best

    if result.model is not None and result.mask is not None:
        result.stability = _stability_diagnostics(result.model, result.mask, train, tokenizer,
                                                  max_length, progress)
    result.files["plot"] = out / "demo.png"
    _plot(result, result.files["plot"])
    result.seconds = time.perf_counter() - start
    return result
