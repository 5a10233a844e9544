"""Every built-in selection method: one frozen config class each, beside its score function.

:data:`BUILTIN` lists them in the order of :data:`sparsetune.METHODS`; the registry maps their
names to them.
"""

from .base import MethodConfig, MethodInfo, builder_config
from .optimizers import ChildTuningFConfig, MixoutConfig
from .projection import ChildPruningConfig, DiffPruningConfig, LtSftConfig
from .rules import BitfitConfig, MagnitudeConfig, NamesConfig, RandomConfig
from .sam import GradientSumConfig, SamConfig, SamCurvatureConfig

BUILTIN: tuple[type[MethodConfig], ...] = (
    RandomConfig,
    BitfitConfig,
    NamesConfig,
    MagnitudeConfig,
    ChildPruningConfig,
    LtSftConfig,
    DiffPruningConfig,
    SamConfig,
    SamCurvatureConfig,
    ChildTuningFConfig,
    MixoutConfig,
)

__all__ = [
    "BUILTIN",
    "BitfitConfig",
    "ChildPruningConfig",
    "ChildTuningFConfig",
    "DiffPruningConfig",
    "GradientSumConfig",
    "LtSftConfig",
    "MagnitudeConfig",
    "MethodConfig",
    "MethodInfo",
    "MixoutConfig",
    "NamesConfig",
    "RandomConfig",
    "SamConfig",
    "SamCurvatureConfig",
    "builder_config",
]
