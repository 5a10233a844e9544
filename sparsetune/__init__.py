"""sparsetune: theory-driven sparse fine-tuning of PyTorch models.

theta = theta0 + M * dtheta with a 0/1 mask M of density p (Fu et al., AAAI 2023). This package
selects M, trains only the selected entries, and ships the result as a sparse delta.
"""

from importlib.metadata import PackageNotFoundError, version

from . import bounds, curvature, data, integrations, modules, subspace
from .delta import BaseModelMismatchError, SparseDelta, merge_deltas, overlap_report
from .errors import (
    CurvatureError,
    FileFormatError,
    FileWriteError,
    InvalidArgumentError,
    InvalidMaskError,
    InvalidScoresError,
    ParameterMismatchError,
    SparsetuneError,
    StateMismatchError,
)
from .files import load_mask, save_mask
from .mask import Mask, ParameterSummary, budget_size
from .modules import DeltaHandle, RequantizeReport, attach
from .optim import (
    ChildTuningF,
    MaskedOptimizer,
    Mixout,
    SparseAdamW,
    SparseSGD,
    optimizer_state_nbytes,
)
from .select import METHODS, select, select_for_task
from .sparse_grad import SparseGradientFallbackWarning, SparseGradients, prepare

try:
    __version__ = version("sparsetune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "METHODS",
    "BaseModelMismatchError",
    "ChildTuningF",
    "CurvatureError",
    "DeltaHandle",
    "FileFormatError",
    "FileWriteError",
    "InvalidArgumentError",
    "InvalidMaskError",
    "InvalidScoresError",
    "Mask",
    "MaskedOptimizer",
    "Mixout",
    "ParameterMismatchError",
    "ParameterSummary",
    "RequantizeReport",
    "SparseAdamW",
    "SparseDelta",
    "SparseGradientFallbackWarning",
    "SparseGradients",
    "SparseSGD",
    "SparsetuneError",
    "StateMismatchError",
    "__version__",
    "attach",
    "bounds",
    "budget_size",
    "curvature",
    "data",
    "integrations",
    "load_mask",
    "merge_deltas",
    "modules",
    "optimizer_state_nbytes",
    "overlap_report",
    "prepare",
    "save_mask",
    "select",
    "select_for_task",
    "subspace",
]
