"""The deltas of one layer: a child module named ``sparse_deltas`` and a forward hook.

:class:`LayerDelta` holds one named delta of one layer: ``weight_values`` (an nn.Parameter of
the k selected entries of the weight, zero at start) with ``weight_indices`` ((2, k) int64
(row, column) pairs, row-major sorted: the order of ``torch.nonzero`` over the mask, which is
also :class:`~sparsetune.SparseDelta`'s order), and optionally ``bias_values`` /
``bias_indices`` for a selected bias. :class:`DeltaSlot` holds the named deltas of one layer,
which of them are active and which are merged, and adds ``delta(x)`` of every active, unmerged
delta to the layer's output in a forward hook.

Why a child module and a hook: ``model.to(device)`` moves the values and indices with the
layer (optimizers keep the same Parameter objects), the layer's own forward runs untouched (a
quantized or otherwise subclassed weight keeps its kernel), and removing the child and the hook
leaves the layer exactly as it was. The one exception is speed: exactly nn.Linear and
transformers' Conv1D get an instance ``forward`` (:meth:`DeltaSlot.fused_forward`) that runs the
base product and the deltas as one function (:class:`~.functions.LinearWithDeltas`), and falls
back to the class's own forward plus the hook's sum wherever that does not apply (quantized
weight, autocast); removing the slot deletes that attribute.

The slot hides itself from ``state_dict`` and ``load_state_dict``: the model's state dict is
the base's (same keys, same tensors); deltas are saved with
:meth:`~sparsetune.modules.DeltaHandle.to_delta`. ``model.to(dtype)`` / ``model.half()`` keep
the values in their own dtype (float32, or float64 over a float64 base).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._checks import logical_shape
from ..sparse_grad import Plan
from .functions import CsrLayout, DeltaSpec, EmbeddingDelta, LinearDelta, LinearWithDeltas

__all__ = ["SLOT", "DeltaSlot", "LayerDelta", "MergedDelta", "fusable_layer", "layer_kind",
           "merged_weight_values", "values_dtype"]

#: Attribute name of the child module that holds a layer's deltas.
SLOT = "sparse_deltas"


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (transformers' Conv1D), ``"embedding"`` or None (not covered)."""
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else None
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    return None


def values_dtype(weight: Tensor) -> torch.dtype:
    """float64 over a float64 base, float32 otherwise (16-bit and quantized bases included)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def merged_weight_values(base: Tensor, values: Tensor) -> Tensor:
    """theta0 + v at the selected entries, summed in ``values.dtype`` and rounded once to
    ``base.dtype``; base, values: (k,) -> (k,) (:mod:`.attach` docstring)."""
    return (base.to(values.dtype) + values).to(base.dtype)


class LayerDelta(nn.Module):
    """One named delta of one layer: the values of the selected weight (and bias) entries."""

    def __init__(
        self, weight_indices: Tensor, bias_indices: Tensor | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        device = weight_indices.device
        self.register_buffer("weight_indices", weight_indices)
        self.weight_values = nn.Parameter(
            torch.zeros(weight_indices.shape[1], dtype=dtype, device=device))
        self.register_buffer("bias_indices", bias_indices)
        self.bias_values = None if bias_indices is None else nn.Parameter(
            torch.zeros(bias_indices.numel(), dtype=dtype, device=device))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Not part of the model's state dict (see the module docstring)."""


class MergedDelta(NamedTuple):
    """What a merge of delta ``name`` into one layer replaced, for the unmerge: ``weight`` the
    base values at its selected entries, or (``requantized``) the whole original quantized
    weight Parameter; ``bias`` the bias values at its selected entries, or None."""

    name: str
    weight: Tensor
    bias: Tensor | None
    requantized: bool = False


class DeltaSlot(nn.Module):
    """The named deltas of one covered layer (see the module docstring).

    ``active``: the names whose delta the forward adds (several: their sum); ``merged``: the
    deltas folded into the base weight, in merge order (:class:`MergedDelta`).
    """

    #: Whether fusable layers take :class:`LinearWithDeltas` (False: the slow twin, for tests).
    fuse: bool = True

    def __init__(self, layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.shape = tuple(logical_shape(layer.weight))
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[MergedDelta] = []
        self._plans: dict[tuple[str, torch.device], tuple[Plan, Any, Any]] = {}
        self._hook = None
        if fusable_layer(layer):
            layer.forward = _FusedForward(layer)
        else:
            self._hook = layer.register_forward_hook(self._add_deltas)

    # -- state dict: hidden ---------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> Any:
        """Nothing: the model's state dict stays the base's (module docstring)."""
        return OrderedDict() if destination is None else destination

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: deltas are loaded with ``SparseDelta.attach_to``."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DeltaSlot:
        """Move with the model (``.to(device)``) but keep each tensor's dtype: values stay
        float32 when the base is cast to 16 bits."""

        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return out.to(t.dtype) if out.dtype != t.dtype else out

        self._plans.clear()
        return super()._apply(keep_dtype, recurse)

    # -- deltas ---------------------------------------------------------------------------
    def add(self, name: str, delta: LayerDelta) -> None:
        self.deltas[name] = delta
        self.active.append(name)

    def drop(self, name: str) -> None:
        del self.deltas[name]
        self.active = [n for n in self.active if n != name]
        self._plans = {key: v for key, v in self._plans.items() if key[0] != name}

    def detach_hook(self, layer: nn.Module) -> None:
        """Give ``layer`` its own forward back (the hook removed, or the fused forward)."""
        if self._hook is not None:
            self._hook.remove()
        if isinstance(layer.__dict__.get("forward"), _FusedForward):
            del layer.__dict__["forward"]

    def applied(self) -> list[str]:
        """The names whose delta the forward adds: active and not merged."""
        return [n for n in self.active if not self.is_merged(n)]

    def is_merged(self, name: str) -> bool:
        return any(m.name == name for m in self.merged)

    def plan(self, name: str) -> tuple[Plan, Any, Any]:
        """The sparse-gradient plan of delta ``name`` on its current device and its CSR
        layout: (plan, CsrLayout of the (out, in) matrix, None) for a Linear or Conv1D, (plan,
        CSR row offsets, None) for an Embedding; built on first use."""
        delta = self.deltas[name]
        indices = delta.weight_indices
        key = (name, indices.device)
        if key not in self._plans:
            plan = Plan(name, (self.shape, indices), indices.device,
                        dtype=delta.weight_values.dtype)
            if self.kind == "embedding":
                ptr = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=indices.device)
                ptr[1:] = torch.cumsum(torch.bincount(indices[0], minlength=self.shape[0]), 0)
                self._plans[key] = (plan, ptr, None)
            else:  # the (out, in) matrix
                r, c = indices if self.kind == "linear" else indices.flip(0)
                out, inp = self.shape if self.kind == "linear" else self.shape[::-1]
                self._plans[key] = (plan, CsrLayout(r, c, (out, inp)), None)
        return self._plans[key]

    def delta_output(self, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        """delta(x) of delta ``name``, in the values' dtype: (..., out) (Embedding: (..., dim))."""
        delta = self.deltas[name]
        plan, first, _ = self.plan(name)
        if self.kind == "embedding":
            return EmbeddingDelta.apply(x, delta.weight_values, plan, first, layer.padding_idx,
                                        layer.scale_grad_by_freq)
        out_features = self.shape[1] if self.kind == "conv1d" else self.shape[0]
        y = LinearDelta.apply(x, delta.weight_values, plan, self.kind == "conv1d", first)
        if delta.bias_values is not None:
            bias = torch.zeros(out_features, dtype=y.dtype, device=y.device)
            y = y + bias.index_add(0, delta.bias_indices, delta.bias_values)
        return y

    def fused_forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The forward of a plain nn.Linear or Conv1D (:func:`fusable_layer`): the base
        product and the applied deltas as one :class:`LinearWithDeltas` where
        :meth:`_fuses` holds, else the layer's own forward and then :meth:`_add_deltas` (the
        slow twin)."""
        names = self.applied()
        if not (names and self.fuse and self._fuses(layer, x)):
            return self._add_deltas(layer, (x,), type(layer).forward(layer, x))
        specs, values = [], []
        for name in names:
            plan, layout, _ = self.plan(name)
            delta = self.deltas[name]
            specs.append(DeltaSpec(plan, layout, delta.bias_indices))
            values += [delta.weight_values, delta.bias_values]
        return LinearWithDeltas.apply(x, layer.weight, layer.bias, self.kind == "conv1d",
                                      tuple(specs), *values)

    def _fuses(self, layer: nn.Module, x: Tensor) -> bool:
        """Whether this call takes :class:`LinearWithDeltas`: a plain floating weight (not a
        quantized tensor subclass, e.g. after a requantizing merge) on the input's device and
        dtype, a bias of that dtype or none, and no autocast (whose casts the base layer's own
        forward applies)."""
        w, b = layer.weight, layer.bias
        return (
            type(w) in (nn.Parameter, Tensor) and w.is_floating_point()
            and x.dtype == w.dtype and x.device == w.device
            and (b is None or (type(b) in (nn.Parameter, Tensor) and b.dtype == w.dtype))
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _add_deltas(self, layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """The forward hook: ``output + sum_d delta_d(x)`` over the applied deltas, summed in
        the values' dtype and cast once."""
        names = self.applied()
        if not names:
            return output
        x = args[0]
        total = None
        for name in names:
            y = self.delta_output(layer, x, name)
            total = y if total is None else total + y
        return output + total.to(output.dtype)


def fusable_layer(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward is replaced by :meth:`DeltaSlot.fused_forward`: exactly
    nn.Linear (not a subclass such as bitsandbytes' Linear4bit, whose own kernels must run) or
    transformers' Conv1D, without an instance ``forward`` of its own already (accelerate's
    device-map hooks wrap the forward that way: it keeps its wrapper, the deltas a hook)."""
    return ((type(layer) is nn.Linear or layer_kind(layer) == "conv1d")
            and "forward" not in layer.__dict__)


class _FusedForward:
    """The instance ``forward`` of a fusable layer with a slot: :meth:`DeltaSlot.fused_forward`.
    A plain object holding the layer (not a bound method, which pickles by name), so a deepcopy
    or pickle of the model carries it and points at the copy."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, input: Tensor) -> Tensor:
        return getattr(self.layer, SLOT).fused_forward(self.layer, input)
