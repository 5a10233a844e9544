"""Masked and compact-state optimizers.

* :class:`MaskedOptimizer` wraps any ``torch.optim.Optimizer``: frozen entries never move.
* :class:`SparseAdamW`, :class:`SparseSGD` keep state only for the selected entries.
* :func:`prepare` turns on sparse-gradient training: backward computes only selected entries.
* :class:`ChildTuningF` redraws a random gradient mask at every step (Child-Tuning-F).
* :class:`Mixout` mixes entries back to their pretrained values at random every step (Mixout).
"""

from ._selection import Selection, optimizer_state_nbytes
from .child_tuning import ChildTuningF
from .masked import MaskedOptimizer
from .mixout import Mixout
from .sparse_adamw import SparseAdamW
from .sparse_gradients import SparseGradientFallbackWarning, SparseGradients, prepare
from .sparse_sgd import SparseSGD

__all__ = [
    "ChildTuningF",
    "MaskedOptimizer",
    "Mixout",
    "Selection",
    "SparseAdamW",
    "SparseGradientFallbackWarning",
    "SparseGradients",
    "SparseSGD",
    "optimizer_state_nbytes",
    "prepare",
]
