"""Hooks of the compact optimizers: step-in-backward handles and ``state_dict`` hooks."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from .selection import STATE_KEY, check_fingerprint, mask_fingerprint


class StepInBackward:
    """Handle of :meth:`CompactStateOptimizer.step_in_backward`; ``remove()`` ends the mode."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def add_fingerprint(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict[STATE_KEY] = mask_fingerprint(optimizer.mask)


def pop_and_check_fingerprint(
    optimizer: Optimizer, state_dict: dict[str, Any]
) -> None:
    check_fingerprint(state_dict.pop(STATE_KEY, None), optimizer.mask, type(optimizer).__name__)


def impl_from_foreach(optimizer: Any, state_dict: dict[str, Any]) -> None:
    # States saved before ``impl`` existed name the step by ``foreach`` in each group.
    groups = []
    for group in state_dict["param_groups"]:
        if "foreach" in group:
            group = dict(group)
            foreach = group.pop("foreach")
            group["impl"] = optimizer._resolved_impl(group.get("impl"), foreach)
        groups.append(group)
    state_dict["param_groups"] = groups
