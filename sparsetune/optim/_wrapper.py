"""OptimizerWrapper: the Optimizer contract for optimizers that wrap another one."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from ..errors import InvalidArgumentError
from .selection import STATE_KEY


class OptimizerWrapper(Optimizer):
    """Base of wrappers: ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's.

    So LR schedulers, ``GradScaler``, Accelerate and the transformers ``Trainer`` see one
    ordinary optimizer. Hooks registered on the wrapper run around the wrapper's whole step.
    ``state_dict()`` is the inner one plus the wrapper's own entry under ``'sparsetune'``
    (:meth:`_extra_state`), which :meth:`load_state_dict` hands to :meth:`_load_extra_state`.
    Attributes the wrapper lacks are read from the inner optimizer.
    """

    #: Our step() takes no GradScaler keyword arguments, whatever the inner optimizer supports.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise InvalidArgumentError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        # Deliberately not calling Optimizer.__init__: param_groups and state are the inner's.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks: use the inner optimizer's (e.g.
        # transformers' AdafactorSchedule calls optimizer._get_lr).
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _extra_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_extra_state(self, saved: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus this wrapper's entry under ``'sparsetune'``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = dict(self.optimizer.state_dict())
        state[STATE_KEY] = self._extra_state()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same kind of wrapper (checked), then the inner state."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_extra_state(state_dict.pop(STATE_KEY, None))
        self.optimizer.load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
