"""Masked and compact-state optimizers.

* :class:`MaskedOptimizer` wraps any ``torch.optim.Optimizer``: frozen entries never move.
* :class:`SparseAdamW`, :class:`SparseSGD` keep state only for the selected entries (their step
  runs as ``impl`` says: ``"flat"``, ``"foreach"`` or ``"forloop"``, see :mod:`.compact`); they
  also read the compact gradients of :func:`sparsetune.prepare` (:mod:`sparsetune.sparse_grad`),
  and keep fp32 master values of the selected entries of bf16/fp16 parameters (:mod:`.masters`).
* :class:`ChildTuningF` redraws a random gradient mask at every step (Child-Tuning-F).
* :class:`Mixout` mixes entries back to their pretrained values at random every step (Mixout).
"""

from .child_tuning import ChildTuningF
from .masked import MaskedOptimizer
from .mixout import Mixout
from .selection import Selection, optimizer_state_nbytes, reject_sharded_parameters
from .sparse_adamw import SparseAdamW
from .sparse_sgd import SparseSGD

__all__ = [
    "ChildTuningF",
    "MaskedOptimizer",
    "Mixout",
    "Selection",
    "SparseAdamW",
    "SparseSGD",
    "optimizer_state_nbytes",
    "reject_sharded_parameters",
]
