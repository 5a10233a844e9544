"""Base class of the compact-state optimizers: state only for the selected entries.

The step has four implementations (``impl``, :data:`IMPLS`), which give the same results:
``"flat"`` lays a param group's selected entries end to end (one buffer per state key) and
updates them with one set of tensor ops per step; ``"packed"`` (opt-in) also lays the
parameters and gradients end to end: O(1) launches per step (costs: :mod:`.flat`);
``"foreach"``: torch's multi-tensor ops; ``"forloop"``: one parameter at a time (the twin).
Parameters with no selected entry stop requiring grad (:mod:`.freezing`).

Every step starts from the parameters' current values (they are read, O(k), at each step), so
writes between steps of any kind are seen. bf16/fp16 parameters get fp32 master values of
their selected entries and fp32 state (:mod:`.masters`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._checks import check_non_negative
from ..errors import InvalidArgumentError
from ..mask import Mask
from ..sparse_grad import selected_gradient
from . import sharded
from .flat import FlatGroup
from .freezing import apply_freezing, check_freeze_unselected, frozen_by_optimizer
from .grad_accumulation import DenseFp32Accumulator, check_fp32_grad_accumulation
from .hooks import StepInBackward, add_fingerprint, impl_from_foreach, pop_and_check_fingerprint
from .masters import (
    LOW_PRECISION,
    check_master_weights,
    fit_state,
    remember_full_precision_state,
    restore_full_precision_state,
    resync_,
    state_dtype,
    uses_master,
)
from .selection import Selection, check_coverage, named_parameter_groups

DECAY_TARGETS = ("zero", "init")
#: The implementations of the compact step, fastest first (see the module docstring).
IMPLS = ("flat", "packed", "foreach", "forloop")
FLAT_IMPLS = ("flat", "packed")


class CompactStateOptimizer(Optimizer):
    """An Optimizer whose per-parameter state covers only the entries a :class:`Mask` selects.

    Subclasses implement :meth:`_update_single` and :meth:`_update_foreach` on 1-D tensors of
    selected values, and list the implementations of the step they offer in :attr:`impls`
    (``"flat"`` needs :meth:`_flat_keys` too). Parameters are given by name (a module,
    ``named_parameters()``, or groups of ``(name, parameter)``) so the mask can be matched to
    them. A parameter with no selected entry is never touched (and, with
    ``freeze_unselected``, stops requiring grad: :mod:`.freezing`); a fully selected one is
    updated in place with no index. Gradients may be dense, or the compact ones of
    :func:`sparsetune.prepare`. :meth:`clip_grad_norm_` clips by the norm of the selected
    entries; :meth:`step_in_backward` fuses the update into ``backward()``.

    The step runs as each param group's ``"impl"`` says (see :data:`IMPLS`); ``"flat"`` falls
    back to ``"foreach"`` for a step where some selected parameter of the group has no
    gradient, and for a group whose parameters differ in device or dtype or are not contiguous.
    Each step reads the selected values from the parameters, so writes made between steps (of
    any kind) are the starting point. ``"master_weights"``: :mod:`sparsetune.optim.masters`.
    FSDP2 (``fully_shard``): each rank keeps state for the selected entries of its own shard
    and ``state_dict()`` is this rank's; see :mod:`sparsetune.optim.sharded`.
    """

    #: The values of ``impl`` this optimizer offers; the first is the automatic choice.
    impls: tuple[str, ...] = ("foreach", "forloop")

    def __init__(self, model_or_named_params: Any, mask: Mask, defaults: dict[str, Any],
                 freeze_unselected: bool | None = None) -> None:
        check_freeze_unselected(freeze_unselected)
        if not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
        if defaults.get("decay_to") not in DECAY_TARGETS:
            raise InvalidArgumentError(
                f"decay_to must be one of {list(DECAY_TARGETS)}, got {defaults.get('decay_to')!r}"
            )
        check_master_weights(defaults.get("master_weights"))
        check_fp32_grad_accumulation(defaults.get("fp32_grad_accumulation"))
        defaults = dict(defaults)
        defaults["impl"] = self._resolved_impl(defaults.get("impl"), defaults.pop("foreach", None))
        if isinstance(model_or_named_params, torch.nn.Module):
            mask.check(model_or_named_params)
        groups = named_parameter_groups(model_or_named_params)
        self.mask = mask
        self._selections: dict[Tensor, Selection] = {}
        self._flats: dict[int, FlatGroup] = {}
        self._accumulators: dict[Tensor, DenseFp32Accumulator] = {}
        self._shard_group: Any = None  # FSDP2: the group of the ranks holding the shards
        super().__init__(groups, defaults)
        self.register_state_dict_post_hook(add_fingerprint)
        self.register_state_dict_post_hook(sharded.add_shard)
        self.register_load_state_dict_pre_hook(sharded.check_shard, prepend=True)
        self.register_load_state_dict_pre_hook(pop_and_check_fingerprint)
        self.register_load_state_dict_pre_hook(impl_from_foreach)
        self.register_load_state_dict_pre_hook(remember_full_precision_state)
        self.register_load_state_dict_post_hook(_forget_flat_state)
        self.register_load_state_dict_post_hook(restore_full_precision_state)
        named = ((n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"]))
        self.frozen_parameters = tuple(apply_freezing(named, mask, freeze_unselected))

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        # torch.amp.GradScaler refuses to unscale fp16 gradients itself; with fp16 parameters
        # it hands this optimizer ``grad_scale`` and ``found_inf`` instead (see :meth:`step`).
        return any(p.dtype == torch.float16 for g in self.param_groups for p in g["params"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of ``(name, parameter)`` pairs; on any error the optimizer is unchanged."""
        decay_to = param_group.get("decay_to", self.defaults["decay_to"])
        if decay_to not in DECAY_TARGETS:
            raise InvalidArgumentError(
                f"decay_to must be one of {list(DECAY_TARGETS)}, got {decay_to!r}"
            )
        check_master_weights(param_group.get("master_weights"))
        check_fp32_grad_accumulation(param_group.get("fp32_grad_accumulation"))
        if "impl" in param_group or "foreach" in param_group:
            param_group = dict(param_group)
            foreach = param_group.pop("foreach", None)
            param_group["impl"] = self._resolved_impl(param_group.get("impl"), foreach)
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            names = group.get("param_names")
            if names is None:
                raise InvalidArgumentError(
                    f"{type(self).__name__} needs parameter names: give (name, parameter) pairs"
                )
            check_coverage(zip(names, group["params"]), self.mask, type(self).__name__,
                           sharded=True)
            selections = {}
            for name, p in zip(names, group["params"]):
                if name in self.mask and not sharded.is_sharded(p):
                    selections[p] = Selection.from_mask(self.mask, name, p.device)
                    continue
                if name in self.mask:
                    selected = sharded.local_mask(p, self.mask[name])  # FSDP2: this rank's rows
                else:
                    selected = torch.zeros(sharded.local(p).shape, dtype=torch.bool)
                selections[p] = Selection(selected, p.device)
            shard_group = sharded.joined_group(self, group["params"], first=count == 0)
        except BaseException:
            del self.param_groups[count:]  # a failed call leaves the optimizer as it was
            raise
        _forget_flat_state(self)
        self._shard_group = shard_group
        self._selections.update(selections)
        for p, sel in selections.items():
            if group["decay_to"] == "init" and sel.kind != "none":
                self.state[p]["theta0"] = sel.gather(sharded.local(p)).detach().clone()
            if (
                sel.kind != "none"
                and not sharded.is_sharded(p)
                and p.dtype in LOW_PRECISION
                and uses_master(group, p)
                and group["fp32_grad_accumulation"] is not False
                and (p.requires_grad or frozen_by_optimizer(p))  # the latter: thawed below
            ):
                self._accumulators[p] = DenseFp32Accumulator(p, sel)

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
                    values.append(self._gradient(group, p, sel))
                    grads.append(p)
        if not values and self._shard_group is None:
            return torch.tensor(0.0)
        device = values[0].device if values else torch.device("cpu")
        norms = [  # bf16/fp16 gradients: the norm in fp32
            torch.linalg.vector_norm(v, norm_type, dtype=_at_least_fp32(v.dtype)).to(device)
            for v in values
        ]
        if self._shard_group is not None:  # FSDP2: every rank holds a share of the entries
            total = sharded.global_norm(norms, norm_type, self._shard_group, device)
        else:
            total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise InvalidArgumentError(
                f"the total norm of order {norm_type} of the selected gradients is "
                f"{float(total)}; set error_if_nonfinite=False to clip anyway"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p, value in zip(grads, values):
            g = sharded.local(p.grad)
            (g._values() if g.is_sparse else g).mul_(coef.to(g.device))
            accumulator = self._accumulators.get(p)
            if accumulator is not None and value.dtype == torch.float32 and not g.is_sparse:
                accumulator.set_(p, value * coef.to(value.device))  # the fp32 sum, clipped
        return total

    def _gradient(
        self, group: dict[str, Any], p: Tensor, sel: Selection, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``p``'s gradient at its selected entries; float32 from the fp32 accumulator for a
        16-bit parameter with one (:mod:`.grad_accumulation`), else in ``dtype``."""
        if sharded.is_sharded(p):
            return sharded.local_gradient(p, sel.index, dtype)
        accumulator = self._accumulators.get(p)
        if accumulator is not None and not p.grad.is_sparse and uses_master(group, p):
            return accumulator.read(selected_gradient(p, sel.index))
        return selected_gradient(p, sel.index, dtype=dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; the fp32 gradient sums restart too."""
        super().zero_grad(set_to_none)
        if not set_to_none:
            for accumulator in self._accumulators.values():
                accumulator.reset()

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
        sharded.refuse_step_in_backward(self)
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
        """One update of the selected entries, from the parameters' current values.

        Under ``torch.amp.GradScaler`` with fp16 parameters, the scaler sets ``grad_scale`` and
        ``found_inf`` on this optimizer: a step with non-finite gradients changes nothing
        (parameters, masters, state, step counts), and otherwise the selected gradients are
        divided by the scale (in fp32 with masters) before use. torch refuses
        ``scaler.unscale_`` on fp16 gradients, so clipping under a scaler needs fp32 or bf16
        parameters.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf != 0):
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        for index, group in enumerate(self.param_groups):
            flat = self._flat_group(index, group) if group["impl"] in FLAT_IMPLS else None
            if flat is not None and flat.ready(self.state):
                self._step_flat(group, flat, grad_scale)
            else:
                self._step_per_parameter(group, grad_scale=grad_scale)
        return loss

    def _step_per_parameter(
        self,
        group: dict[str, Any],
        only: list[Tensor] | None = None,
        grad_scale: Tensor | None = None,
    ) -> None:
        params, grads, values, states = [], [], [], []
        for p in group["params"] if only is None else only:
            sel = self._selections[p]
            if p.grad is None or sel.kind == "none":
                continue
            state = self.state[p]
            p_local = sharded.local(p)  # FSDP2: this rank's shard, which the selection indexes
            if "step" not in state:
                self._init_state(group, state, sel.count, p_local)
            master = fit_state(group, state, p_local, sel)
            value = sel.gather(p_local)
            value = resync_(state["master"], value) if master else value
            params.append((p_local, sel, master))
            grads.append(_unscaled(self._gradient(group, p, sel, value.dtype), value.dtype,
                                   grad_scale))
            values.append(value)
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
        for (p, sel, master), value in zip(params, values):
            sel.scatter_(p, value.to(p.dtype) if master else value)

    def _flat_group(self, index: int, group: dict[str, Any]) -> FlatGroup | None:
        """The group's flat state, built on first use; None where the fast path cannot run."""
        flat = self._flats.get(index)
        if flat is not None:
            if flat.valid():
                return flat
            del self._flats[index]  # a parameter was cast, moved or re-laid out: rebuild
            flat.close()
        params = [p for p in group["params"] if self._selections[p].kind != "none"]
        if not params or any(sharded.is_sharded(p) for p in params) or any(
            p.device != params[0].device or p.dtype != params[0].dtype or not p.is_contiguous()
            for p in params
        ):
            return None
        if any(p.grad is None for p in params):
            return None  # build once every parameter has a gradient (and so its state)
        masters = []
        for p in params:
            sel, state = self._selections[p], self.state[p]
            if "step" not in state:
                self._init_state(group, state, sel.count, p)
            masters.append(fit_state(group, state, p, sel))
        keys = self._flat_keys(group) + (["master"] if masters[0] else [])
        if any(self.state[p].get(key) is None for p in params for key in keys):
            return None  # state created by the first update (SGD's momentum buffer)
        flat = FlatGroup(params, [self._selections[p] for p in params], keys, self.state,
                         pack=group["impl"] == "packed")
        self._flats[index] = flat
        return flat

    def _step_flat(
        self, group: dict[str, Any], flat: FlatGroup, grad_scale: Tensor | None = None
    ) -> None:
        """Gather every selected gradient into one buffer, update once, scatter back."""
        master = flat.buffers.get("master")
        values = flat.gather_values()
        if master is not None:
            values = resync_(master, values)
        accumulators = [self._accumulators.get(p) for p in flat.params]
        if master is not None and all(accumulators) and flat.dense_gradients():
            current = flat.gather_gradients()  # the fp32 sums where .grad is their rounding
            total = torch.cat([a.total for a in accumulators])
            grad = torch.where(current == total.to(current.dtype), total, current.float())
        else:
            grad = flat.gather_gradients(values.dtype)
        grad = _unscaled(grad, values.dtype, grad_scale)
        if group["maximize"]:
            grad.neg_()
        step = self.state[flat.params[0]]["step"] + 1
        for p in flat.params:
            self.state[p]["step"] = step
        self._update_single(group, values, grad, {**flat.buffers, "step": step})
        flat.scatter_values(values if master is None else values.to(flat.params[0].dtype))

    def _init_state(
        self, group: dict[str, Any], state: dict[str, Any], count: int, param: Tensor
    ) -> None:
        """Fill a new ``state`` (``"step"`` and zeros of :func:`state_dtype`)."""
        raise NotImplementedError

    @staticmethod
    def _zeros(group: dict[str, Any], count: int, param: Tensor) -> Tensor:
        """A new state tensor: ``count`` zeros in the state dtype of ``param`` (fp32 with
        masters), on its device."""
        return torch.zeros(count, dtype=state_dtype(group, param), device=param.device)

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


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _unscaled(grad: Tensor, dtype: torch.dtype, grad_scale: Tensor | None) -> Tensor:
    """``grad`` in ``dtype``, divided by GradScaler's scale when one is given (a new tensor
    then: gradients are never changed in place)."""
    grad = grad.to(dtype)
    if grad_scale is None:
        return grad
    return grad / grad_scale.to(device=grad.device, dtype=dtype)


def _forget_flat_state(optimizer: CompactStateOptimizer) -> None:
    # load_state_dict replaced the state tensors: flat buffers are rebuilt from them lazily.
    for flat in optimizer._flats.values():
        flat.close()
    optimizer._flats = {}
