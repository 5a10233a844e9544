"""Selection strategies behind one interface: ``select(model, method, density, ...) -> Mask``.

Families (Fu et al., AAAI 2023): random (``random``), rule-based (``bitfit``, ``names``,
``magnitude``), projection-based (``child_pruning``, ``lt_sft``, ``diff_pruning``) and SAM
(``sam``, ``sam_curvature``);
per-step random methods (``child_tuning_f``) are optimizers, listed here so every method is found
in one place.
Each method is one frozen config class in :mod:`sparsetune.select.methods` (its options, checked
before any work, and its flags): :func:`method_spec` gives it.
Score functions are exported too, for users who want the scores rather than the mask.
"""

from .methods import MethodConfig
from .methods.burn_in import finetuned_values
from .methods.projection import diff_pruning_scores, fisher_scores, lt_sft_scores
from .methods.rules import bitfit_mask, magnitude_scores, names_mask, random_scores
from .methods.sam import (
    DEFAULT_FLOOR_FRACTION,
    accumulated_gradient,
    floored_curvature,
    sam_curvature_scores,
    sam_scores,
)
from .offline import load_task_spec, select_for_task
from .registry import (
    METHODS,
    CheckedSelection,
    MethodInfo,
    check_select,
    method_info,
    method_options,
    method_spec,
    register_method,
    select,
    target_names,
)

__all__ = [
    "DEFAULT_FLOOR_FRACTION",
    "METHODS",
    "CheckedSelection",
    "MethodConfig",
    "MethodInfo",
    "accumulated_gradient",
    "bitfit_mask",
    "check_select",
    "diff_pruning_scores",
    "finetuned_values",
    "fisher_scores",
    "floored_curvature",
    "load_task_spec",
    "lt_sft_scores",
    "magnitude_scores",
    "method_info",
    "method_options",
    "method_spec",
    "names_mask",
    "random_scores",
    "register_method",
    "sam_curvature_scores",
    "sam_scores",
    "select",
    "select_for_task",
    "target_names",
]
