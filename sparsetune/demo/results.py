"""What the real demo measured, and how ``sparsetune demo`` reports and plots it.

:class:`RealDemoResult` holds one :class:`RealDemoRow` per method (the selected mask, a random
mask of the same budget, full fine-tuning); ``report()`` is the printed text and :func:`plot`
draws the loss curves and scores as a PNG. The default learning rates live here too, since the
report quotes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..data import HEAD_PARAMETERS
from ..mask import Mask
from ..select import method_info, method_spec
from .training import WARMUP_FRACTION

__all__ = [
    "DEFAULT_LRS",
    "FULL_FINE_TUNING",
    "UNTUNED_LR",
    "RealDemoResult",
    "RealDemoRow",
    "plot",
]

FULL_FINE_TUNING = "full fine-tuning"
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
        if method_spec(self.method).trains_burn_in:
            return f", after {self.select_batches} burn-in steps of batch {self.batch_size}"
        return (
            f", from {self.select_batches} batches of {self.batch_size} at theta0; "
            "the paper used 600"
        )

    def report(self) -> str:
        metric = "accuracy" if self.metric == "accuracy" else "F1 of the spam class"
        seen = self.steps * self.batch_size
        head = ", ".join(HEAD_PARAMETERS)
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
            f"{self.seed}) for every method; lr warmup over the first {WARMUP_FRACTION:.0%} of the "
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


def plot(result: RealDemoResult, path: Path) -> None:
    """Loss curves (raw and a moving average) and validation/test bars, written as a PNG."""
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
