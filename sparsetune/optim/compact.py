"""Base class of the compact-state optimizers: state only for the selected entries.

The step has three implementations (``impl``, :data:`IMPLS`), which give the same results:
``"flat"`` lays a param group's selected entries end to end (one buffer per state key) and
updates them with one set of tensor ops per step, so the launches do not grow with the number
of tensors; ``"foreach"`` runs torch's multi-tensor ops over the per-parameter tensors;
``"forloop"`` updates one parameter at a time, the obviously-correct twin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._checks import check_non_negative
from ..errors import InvalidArgumentError
from ..mask import Mask
from ..sparse_grad import selected_gradient
from .selection import (
    STATE_KEY,
    Selection,
    check_coverage,
    check_fingerprint,
    mask_fingerprint,
    named_parameter_groups,
)

DECAY_TARGETS = ("zero", "init")
#: The implementations of the compact step, fastest first (see the module docstring).
IMPLS = ("flat", "foreach", "forloop")


class CompactStateOptimizer(Optimizer):
    """An Optimizer whose per-parameter state covers only the entries a :class:`Mask` selects.

    Subclasses implement :meth:`_update_single` and :meth:`_update_foreach` on 1-D tensors of
    selected values, and list the implementations of the step they offer in :attr:`impls`
    (``"flat"`` needs :meth:`_flat_keys` too). Parameters are given by name (a module,
    ``named_parameters()``, or groups of ``(name, parameter)``) so the mask can be matched to
    them. A parameter with no selected entry is never touched; a fully
    selected one is updated in place with no index.

    Gradients may be dense, or the compact ones of :func:`sparsetune.prepare` (the k selected
    values only), which are read directly. :meth:`clip_grad_norm_` clips by the norm of the
    selected entries; :meth:`step_in_backward` fuses the update into ``backward()``.

    The step runs as each param group's ``"impl"`` says (see :data:`IMPLS`); ``"flat"`` falls
    back to ``"foreach"`` for a step where some selected parameter of the group has no
    gradient, and for a group whose parameters differ in device or dtype or are not contiguous.
    """

    #: The values of ``impl`` this optimizer offers; the first is the automatic choice.
    impls: tuple[str, ...] = ("foreach", "forloop")

    def __init__(self, model_or_named_params: Any, mask: Mask, defaults: dict[str, Any]) -> None:
        if not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
        if defaults.get("decay_to") not in DECAY_TARGETS:
            raise InvalidArgumentError(
                f"decay_to must be one of {list(DECAY_TARGETS)}, got {defaults.get('decay_to')!r}"
            )
        defaults = dict(defaults)
        defaults["impl"] = self._resolved_impl(defaults.get("impl"), defaults.pop("foreach", None))
        if isinstance(model_or_named_params, torch.nn.Module):
            mask.check(model_or_named_params)
        groups = named_parameter_groups(model_or_named_params)
        self.mask = mask
        self._selections: dict[Tensor, Selection] = {}
        self._flats: dict[int, _FlatGroup] = {}
        super().__init__(groups, defaults)
        self.register_state_dict_post_hook(_add_fingerprint)
        self.register_load_state_dict_pre_hook(_pop_and_check_fingerprint)
        self.register_load_state_dict_pre_hook(_impl_from_foreach)
        self.register_load_state_dict_post_hook(_forget_flat_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        decay_to = param_group.get("decay_to", self.defaults["decay_to"])
        if decay_to not in DECAY_TARGETS:
            raise InvalidArgumentError(
                f"decay_to must be one of {list(DECAY_TARGETS)}, got {decay_to!r}"
            )
        if "impl" in param_group or "foreach" in param_group:
            foreach = param_group.pop("foreach", None)
            param_group["impl"] = self._resolved_impl(param_group.get("impl"), foreach)
        super().add_param_group(param_group)
        self._flats = {}
        group = self.param_groups[-1]
        names = group.get("param_names")
        if names is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} needs parameter names: give (name, parameter) pairs"
            )
        check_coverage(zip(names, group["params"]), self.mask, type(self).__name__)
        for name, p in zip(names, group["params"]):
            selected = self.mask[name] if name in self.mask else torch.zeros(p.shape, dtype=bool)
            self._selections[p] = Selection(selected, p.device)
            if group["decay_to"] == "init" and self._selections[p].kind != "none":
                self.state[p]["theta0"] = self._selections[p].gather(p).detach().clone()

    @classmethod
    def _resolved_impl(cls, impl: str | None, foreach: bool | None = None) -> str:
        """``impl`` checked against :attr:`impls`; None: from ``foreach`` (False: "forloop"),
        else the automatic choice ``impls[0]``."""
        if impl is not None and impl not in cls.impls:
            raise InvalidArgumentError(
                f"{cls.__name__}: impl must be one of {list(cls.impls)} or None (automatic: "
                f"{cls.impls[0]!r}), got {impl!r}"
            )
        if impl is None:
            return "forloop" if foreach is not None and not foreach else cls.impls[0]
        if foreach is not None and bool(foreach) == (impl == "forloop"):
            raise InvalidArgumentError(
                f"{cls.__name__}: impl={impl!r} contradicts foreach={foreach!r}; give impl alone"
            )
        return impl

    def selection(self, param: Tensor) -> Selection:
        """The selected entries of ``param`` (flat indices, or all / none)."""
        return self._selections[param]

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> Tensor:
        """Scale the gradients so that the norm of their selected entries is at most max_norm.

        The global ``norm_type`` norm is taken over the selected entries of every parameter
        (gradients at frozen entries are never used, so they do not count), and every gradient
        is multiplied by min(1, max_norm / (norm + 1e-6)), as ``torch.nn.utils.clip_grad_norm_``
        does. Works on dense gradients and on the compact ones of :func:`sparsetune.prepare`
        (which ``torch.nn.utils.clip_grad_norm_`` rejects). Returns the norm before clipping.
        """
        max_norm = check_non_negative("max_norm", max_norm)
        norm_type = float(norm_type)
        values, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                sel = self._selections[p]
                if p.grad is not None and sel.kind != "none":
                    values.append(selected_gradient(p, sel.index))
                    grads.append(p.grad)
        if not values:
            return torch.tensor(0.0)
        device = values[0].device
        norms = [torch.linalg.vector_norm(v, norm_type).to(device) for v in values]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise InvalidArgumentError(
                f"the total norm of order {norm_type} of the selected gradients is "
                f"{float(total)}; set error_if_nonfinite=False to clip anyway"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            (g._values() if g.is_sparse else g).mul_(coef.to(g.device))
        return total

    def step_in_backward(self) -> StepInBackward:
        """Update each parameter inside ``backward()``, as soon as its gradient is complete.

        A post-accumulate-grad hook on every parameter with selected entries runs this
        optimizer's update for that parameter alone and then frees its gradient, so no full set
        of gradients is ever held (with :func:`sparsetune.prepare`, not even compact ones).
        The updates are the ones :meth:`step` would make; ``step()`` then finds no gradient and
        does nothing, so a training loop need not change. Every ``backward()`` is one step:
        no gradient accumulation, and no clipping by a global norm (it needs every gradient
        first). Optimizer step hooks do not run for these updates. Returns a handle whose
        ``remove()`` ends the mode.
        """
        handles = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if self._selections[p].kind != "none" and p.requires_grad:
                    hook = functools.partial(self._step_in_backward, index)
                    handles.append(p.register_post_accumulate_grad_hook(hook))
        return StepInBackward(handles)

    @torch.no_grad()
    def _step_in_backward(self, index: int, param: Tensor) -> None:
        self._step_per_parameter(self.param_groups[index], [param])
        param.grad = None

    # -- the step -------------------------------------------------------------------------
    def _flat_keys(self, group: dict[str, Any]) -> list[str]:
        """State keys kept in one flat buffer per group (fast path); empty: per-parameter only."""
        return []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            flat = self._flat_group(index, group) if group["impl"] == "flat" else None
            if flat is not None and flat.ready(self.state):
                self._step_flat(group, flat)
            else:
                self._step_per_parameter(group)
                if flat is not None:
                    flat.forget_values()
        return loss

    def _step_per_parameter(self, group: dict[str, Any], only: list[Tensor] | None = None) -> None:
        params, grads, values, states = [], [], [], []
        for p in group["params"] if only is None else only:
            sel = self._selections[p]
            if p.grad is None or sel.kind == "none":
                continue
            state = self.state[p]
            if "step" not in state:
                self._init_state(group, state, sel.count, p)
            params.append((p, sel))
            grads.append(selected_gradient(p, sel.index))
            values.append(sel.gather(p))
            states.append(state)
        if not params:
            return
        for state in states:
            state["step"] += 1
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["impl"] != "forloop":
            self._update_foreach(group, values, grads, states)
        else:
            for value, grad, state in zip(values, grads, states):
                self._update_single(group, value, grad, state)
        for (p, sel), value in zip(params, values):
            sel.scatter_(p, value)

    def _flat_group(self, index: int, group: dict[str, Any]) -> _FlatGroup | None:
        """The group's flat state, built on first use; None where the fast path cannot run."""
        keys = self._flat_keys(group)
        if not keys:
            return None
        flat = self._flats.get(index)
        if flat is not None:
            return flat
        params = [p for p in group["params"] if self._selections[p].kind != "none"]
        if not params or any(
            p.device != params[0].device or p.dtype != params[0].dtype or not p.is_contiguous()
            for p in params
        ):
            return None
        if any(p.grad is None for p in params):
            return None  # build once every parameter has a gradient (and so its state)
        for p in params:
            if "step" not in self.state[p]:
                self._init_state(group, self.state[p], self._selections[p].count, p)
        flat = _FlatGroup(params, [self._selections[p] for p in params], keys, self.state)
        self._flats[index] = flat
        return flat

    def _step_flat(self, group: dict[str, Any], flat: _FlatGroup) -> None:
        """Gather every selected gradient into one buffer, update once, scatter back."""
        grad = flat.gather_gradients()
        if group["maximize"]:
            grad.neg_()
        values = flat.current_values()
        step = self.state[flat.params[0]]["step"] + 1
        for p in flat.params:
            self.state[p]["step"] = step
        self._update_single(group, values, grad, {**flat.buffers, "step": step})
        flat.scatter_values()

    def _init_state(
        self, group: dict[str, Any], state: dict[str, Any], count: int, param: Tensor
    ) -> None:
        raise NotImplementedError

    def _update_single(
        self, group: dict[str, Any], value: Tensor, grad: Tensor, state: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def _update_foreach(
        self,
        group: dict[str, Any],
        values: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        raise NotImplementedError


class _FlatGroup:
    """One param group's selected entries laid end to end: state, values and gradients.

    ``state[p][key]`` for every key in ``keys`` becomes a view into one flat buffer, so the
    optimizer's arithmetic runs once per group instead of once per parameter, and per-parameter
    views keep ``state_dict()`` unchanged. ``values`` caches the selected parameter values; a
    parameter's slice is trusted only while its version counter and storage are the ones this
    object last wrote (any in-place change by someone else, or ``p.data = ...``, is noticed and
    the slice is read again).
    """

    def __init__(
        self,
        params: list[Tensor],
        selections: list[Selection],
        keys: list[str],
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:
        self.params = params
        self.selections = selections
        counts = [sel.count for sel in selections]
        self.slices = []
        start = 0
        for count in counts:
            self.slices.append(slice(start, start + count))
            start += count
        like = params[0]
        self.buffers = {}
        for key in keys:
            buffer = torch.cat([state[p][key].reshape(-1) for p in params])
            for p, part in zip(params, self.slices):
                state[p][key] = buffer[part]
            self.buffers[key] = buffer
        self.values = torch.empty(start, dtype=like.dtype, device=like.device)
        self._stamps: list[tuple[int, int] | None] = [None] * len(params)

    def ready(self, state: Mapping[Tensor, dict[str, Any]]) -> bool:
        """True when the fast path applies: every gradient present, every step count equal."""
        first = state[self.params[0]].get("step")
        return all(p.grad is not None and state[p].get("step") == first for p in self.params)

    def gather_gradients(self) -> Tensor:
        grad = torch.empty_like(self.values)  # transient: freed after the step
        for p, sel, part in zip(self.params, self.selections, self.slices):
            selected_gradient(p, sel.index, out=grad[part])
        return grad

    def current_values(self) -> Tensor:
        for i, (p, sel, part) in enumerate(zip(self.params, self.selections, self.slices)):
            if self._stamps[i] != (p._version, p.data_ptr()):
                if sel.index is None:
                    self.values[part].copy_(p.view(-1))
                else:
                    torch.index_select(p.view(-1), 0, sel.index, out=self.values[part])
        return self.values

    def scatter_values(self) -> None:
        for i, (p, sel, part) in enumerate(zip(self.params, self.selections, self.slices)):
            sel.scatter_(p, self.values[part])
            self._stamps[i] = (p._version, p.data_ptr())

    def forget_values(self) -> None:
        self._stamps = [None] * len(self.params)

    def tensors(self) -> list[Tensor]:
        return [self.values]


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


def _forget_flat_state(optimizer: CompactStateOptimizer) -> None:
    # load_state_dict replaced the state tensors: flat buffers are rebuilt from them lazily.
    optimizer._flats = {}


def _add_fingerprint(optimizer: CompactStateOptimizer, state_dict: dict[str, Any]) -> None:
    state_dict[STATE_KEY] = mask_fingerprint(optimizer.mask)


def _pop_and_check_fingerprint(
    optimizer: CompactStateOptimizer, state_dict: dict[str, Any]
) -> None:
    check_fingerprint(state_dict.pop(STATE_KEY, None), optimizer.mask, type(optimizer).__name__)


def _impl_from_foreach(optimizer: CompactStateOptimizer, state_dict: dict[str, Any]) -> None:
    # States saved before ``impl`` existed name the step by ``foreach`` in each group.
    groups = []
    for group in state_dict["param_groups"]:
        if "foreach" in group:
            group = dict(group)
            foreach = group.pop("foreach")
            group["impl"] = optimizer._resolved_impl(group.get("impl"), foreach)
        groups.append(group)
    state_dict["param_groups"] = groups
