"""Per-step random methods: listed with the selection methods, implemented as optimizers.

They draw a new random mask at every step, so they give no fixed mask: ``select`` refuses them
and names the optimizer to use instead (:meth:`MethodConfig.refuse_if_per_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig

__all__ = ["ChildTuningFConfig", "MixoutConfig"]


@dataclass(frozen=True)
class ChildTuningFConfig(MethodConfig):
    """``child_tuning_f``: see :class:`sparsetune.ChildTuningF`."""

    name = "child_tuning_f"
    family = "optimizer"
    description = "Child-Tuning-F: a fresh Bernoulli(p) gradient mask each step, scaled by 1/p"
    optimizer = (
        "sparsetune.ChildTuningF(torch.optim.AdamW(model.parameters(), lr=...), reserve_p=p)"
    )


@dataclass(frozen=True)
class MixoutConfig(MethodConfig):
    """``mixout``: see :class:`sparsetune.optim.Mixout`."""

    name = "mixout"
    family = "optimizer"
    description = (
        "Mixout: each step every entry is mixed back to theta0 with probability p, the rest "
        "rescaled by 1/(1-p)"
    )
    optimizer = "sparsetune.optim.Mixout(torch.optim.AdamW(model.parameters(), lr=...), mix_p=p)"
