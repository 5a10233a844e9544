"""Turning sparse-gradient mode on and off (:func:`prepare`, :class:`SparseGradients`), and
reading the compact gradients it produces (:func:`selected_gradient`, :func:`plan_of`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .._checks import reject_sharded, unwrap_compiled
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from .functions import CompactForward, is_covered
from .plan import LINEAR_PRODUCTS, Plan, release_workspace

__all__ = [
    "SparseGradientFallbackWarning", "SparseGradients", "compact_parameters", "plan_of",
    "prepare", "selected_gradient",
]


class SparseGradientFallbackWarning(UserWarning):
    """A partly selected weight keeps its dense gradient (a layer type :func:`prepare` skips)."""


# Parameters whose gradients are compact, and how their sparse gradient is laid out.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_WARNED_DENSE: WeakIdKeyDictionary = WeakIdKeyDictionary()


class SparseGradients:
    """Handle of the sparse-gradient mode on one model (see :func:`prepare`).

    Attributes (parameter names as in ``model.named_parameters()``):
        compact: parameters whose gradient holds only the selected entries.
        dense: selected parameters that keep dense gradients (biases, norms, fully selected
            tensors, and ``fallback``).
        fallback: partly selected weights of layers not covered (dense masked path, warned).
        frozen: parameters with no selected entry, whose ``requires_grad`` was turned off.
    """

    def __init__(self) -> None:
        self.compact: list[str] = []
        self.dense: list[str] = []
        self.fallback: list[str] = []
        self.frozen: list[str] = []
        self._modules: list[nn.Module] = []
        self._params: list[Tensor] = []
        self._frozen_params: list[Tensor] = []
        self._hooks: list = []  # of the float32 accumulators of 16-bit weights
        self.active = True

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"SparseGradients({state}: {len(self.compact)} compact, {len(self.dense)} dense, "
                f"{len(self.fallback)} fallback, {len(self.frozen)} frozen)")

    def __enter__(self) -> SparseGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Leave the model as it was: its modules' forwards and ``requires_grad`` flags.

        A compact gradient still pending in a weight's ``.grad`` becomes a dense tensor with
        zeros at the frozen entries, so an optimizer step taken after ``remove()`` gives the
        same result. Calling it twice does nothing.
        """
        if not self.active:
            return
        for module in self._modules:
            module.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        for p in self._params:
            plan = _PLANS.pop(p, None)
            if plan is not None and plan.accumulator is not None:
                plan.accumulator.detach()
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        for p in self._frozen_params:
            p.requires_grad_(True)
        release_workspace()
        self._modules, self._params, self._frozen_params, self._hooks = [], [], [], []
        self.active = False


def prepare(model: nn.Module, mask: Mask, *, linear_product: str = "auto") -> SparseGradients:
    """Turn on sparse-gradient training for ``model`` with ``mask``; returns the handle.

    Use the same ``mask`` for the optimizer (:class:`~sparsetune.SparseAdamW` or
    :class:`~sparsetune.SparseSGD`), built before or after this call. Call
    ``handle.remove()`` (or use the handle as a context manager) to restore the model. Prepare
    after moving the model to its device and dtype.

    ``linear_product`` chooses how Linear weight gradients are computed at the mask: one of
    :data:`LINEAR_PRODUCTS` (``"auto"``: the cheapest of ``"sampled"``, ``"blocks"`` and,
    on CUDA with Triton installed, the ``"sddmm"`` kernel, per weight by the device type's
    :data:`LINEAR_COSTS`, among those :data:`LINEAR_SUPPORT` can run for the device and dtype;
    the values agree to rounding). Every dtype works: bfloat16 and float16
    gradients are computed with float32 accumulation, and a 16-bit weight's k gradient values
    are summed over backward passes in float32 (4 bytes per selected entry; see
    :func:`selected_gradient`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                             torch.nn.Linear(3, 1))
        >>> bits = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}
        >>> bits["0.weight"][0, 0], bits["0.weight"][1, 0] = True, False
        >>> handle = prepare(model, Mask.from_dict(bits))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> model[0].weight.grad.is_sparse
        True
        >>> handle.remove()
    """
    model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
    reject_sharded(model, "st.prepare", "train a fully_shard'ed model with dense gradients")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mask, Mask):
        raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
    if linear_product not in LINEAR_PRODUCTS:
        raise InvalidArgumentError(
            f"linear_product must be one of {list(LINEAR_PRODUCTS)}, got {linear_product!r}"
        )
    mask.check(model)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in mask]
    if missing:
        raise ParameterMismatchError(
            f"prepare: trainable parameters missing from the mask: {missing}; build the mask "
            f"over every trainable parameter (or turn their requires_grad off)"
        )
    if any(p in _PLANS for p in params.values()):
        raise InvalidArgumentError(
            "prepare: this model is already in sparse-gradient mode; call remove() on its "
            "handle first"
        )
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)

    handle = SparseGradients()
    uncovered = []
    for name, p in params.items():
        if name not in mask:
            continue  # not trainable (checked above)
        selected = mask[name]
        count = int(torch.count_nonzero(selected))
        if count == 0:
            if p.requires_grad:
                p.requires_grad_(False)
                handle.frozen.append(name)
                handle._frozen_params.append(p)
            continue
        if not p.requires_grad:
            continue
        mods = owners.get(id(p), [])
        as_weight = [m for m in mods if getattr(m, "weight", None) is p and is_covered(m)]
        if count == selected.numel() or not as_weight:
            handle.dense.append(name)
            if count < selected.numel() and p.dim() >= 2:
                uncovered.append(f"{name} ({', '.join(type(m).__name__ for m in mods)})")
                handle.fallback.append(name)
            continue
        plan = Plan(name, selected, p.device, linear_product, p.dtype)
        _PLANS[p] = plan
        if plan.accumulator is not None:
            handle._hooks.extend(plan.accumulator.attach(p))
        handle._params.append(p)
        handle.compact.append(name)
        for m in as_weight:
            m.forward = CompactForward(m, plan)
            handle._modules.append(m)
        others = [m for m in mods if m not in as_weight]
        if others:
            uncovered.append(f"{name} (also used by {', '.join(type(m).__name__ for m in others)})")
            handle.fallback.append(name)
    if uncovered:
        warnings.warn(
            f"sparse-gradient mode covers nn.Linear, nn.Embedding (without max_norm) and "
            f"transformers' Conv1D; these "
            f"partly selected weights keep dense gradients (correct, but nothing is saved): "
            f"{uncovered}",
            SparseGradientFallbackWarning,
            stacklevel=2,
        )
    return handle


def selected_gradient(
    param: Tensor, index: Tensor | None = None, out: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The gradient of ``param`` at its selected entries, 1-D in row-major order.

    ``index``: the sorted flat (row-major) indices of the selected entries, None for all of them
    (``Selection.index`` in :mod:`sparsetune.optim`). A dense ``param.grad`` is gathered; a
    compact gradient from :func:`prepare` is read as is (a view of its values unless ``out`` is
    given, which receives a copy), and its entries must be the ones ``index`` names.

    ``dtype`` (None: the gradient's own) converts the result; for a 16-bit weight in
    sparse-gradient mode, asking for float32 (or giving a float32 ``out``) returns the values
    accumulated in float32 over the backward passes (exact where ``.grad`` holds their
    rounding; once something else changed ``.grad``, its values converted).
    """
    grad = param.grad
    plan = _PLANS.get(param)
    if not grad.is_sparse:
        if plan is not None and param not in _WARNED_DENSE:
            _WARNED_DENSE[param] = True
            warnings.warn(
                f"parameter '{plan.name}' is in sparse-gradient mode but received a dense "
                f"gradient: its weight is used outside its module's forward (for example by "
                f"nn.MultiheadAttention); the result stays exact, but nothing is saved for it",
                SparseGradientFallbackWarning,
                stacklevel=3,
            )
        flat = grad.reshape(-1)
        if out is None:
            values = flat if index is None else flat.index_select(0, index)
            return values if dtype is None else values.to(dtype)
        if index is None:
            return out.copy_(flat)
        if out.dtype != flat.dtype:
            return out.copy_(flat.index_select(0, index))
        return torch.index_select(flat, 0, index, out=out)
    values = plan.values_of(grad, index) if plan is not None else None
    if values is None:
        raise InvalidArgumentError(
            "sparse gradients are supported only as produced by sparsetune.prepare(); got one "
            "from elsewhere (nn.Embedding(sparse=True)?): use dense gradients"
        )
    wanted = out.dtype if out is not None else dtype
    if wanted is not None and wanted != values.dtype and plan.accumulator is not None:
        precise = plan.accumulator.precise(grad)
        values = values if precise is None else precise
    if out is not None:
        return out.copy_(values)
    return values if dtype is None else values.to(dtype)


def plan_of(param: Tensor) -> Plan | None:
    """The :class:`~sparsetune.sparse_grad.plan.Plan` of ``param`` while :func:`prepare` gives
    it compact gradients (its indices, ``linear_product``, ``sparse(values)``), else None."""
    return _PLANS.get(param)


def compact_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, parameter)`` of ``model`` whose gradients are compact (for tests and reports)."""
    for name, p in model.named_parameters():
        if p in _PLANS:
            yield name, p
