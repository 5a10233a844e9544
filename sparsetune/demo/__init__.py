"""End-to-end demos: the embedded MiniLM on a real text task, and a small digits MLP.

:func:`run_real_demo` (``sparsetune demo``, module ``real``) is the paper's experiment in a few
minutes on a CPU: the embedded all-MiniLM-L6-v2 gets a fresh classification head and is
fine-tuned on one of the offline tasks of :mod:`sparsetune.data` three ways, on the same steps,
batches and dropout draws: with a selected mask (SAM by default), with a random mask of the same
density and head, and in full. It prints the scores, the trained entries, the optimizer state
and the wall time of each (module ``results``), and saves the mask, the sparse delta and a plot.

:func:`run_digits_demo` (``sparsetune demo-digits``, module ``digits``) tells the same story in
seconds on scikit-learn's handwritten digits: a small MLP is *pretrained* on the digits 0-4,
then *fine-tuned* to tell apart the digits 5-9 from only a few labelled examples, with a fresh
task head that is always trained. We compare, at the same number of steps:

* head only (nothing of the body moves),
* a random mask of density p over the body,
* the SAM mask (paper's practical variant: largest squared accumulated gradient at theta0),
* full fine-tuning,

all trained with :class:`sparsetune.SparseAdamW` (full fine-tuning uses a full mask, which is
exactly AdamW).

The training loop of the real demo (module ``training``: :func:`fine_tune`,
:func:`warmup_then_decay`, :func:`first`) is shared with the benchmarks.
"""

from .digits import DemoResult, DemoRow, run_digits_demo
from .real import REAL_DEMO_METHODS, run_real_demo
from .results import DEFAULT_LRS, FULL_FINE_TUNING, UNTUNED_LR, RealDemoResult, RealDemoRow
from .training import fine_tune, first, warmup_then_decay

__all__ = [
    "DEFAULT_LRS",
    "FULL_FINE_TUNING",
    "REAL_DEMO_METHODS",
    "UNTUNED_LR",
    "DemoResult",
    "DemoRow",
    "RealDemoResult",
    "RealDemoRow",
    "fine_tune",
    "first",
    "run_digits_demo",
    "run_real_demo",
    "warmup_then_decay",
]
