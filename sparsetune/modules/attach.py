"""``attach(model, mask, name)``: a trainable sparse delta over a frozen base, LoRA-style.

theta = theta0 + M dtheta (theory/ E1) with theta0 frozen and never written: every covered
layer (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``) whose weight the mask
touches gets the k selected entries of dtheta as an float32 ``nn.Parameter`` (float64 over a
float64 base), zero at start, and computes base(x) + delta(x) without building W0 + S
(:mod:`.functions`). A selected bias of such a layer gets its own values. Any torch optimizer
trains :meth:`DeltaHandle.parameters` (fused AdamW included); weight decay there pulls the
values towards 0, i.e. theta towards theta0 (in-place AdamW decays theta towards 0).

Several deltas live side by side (``attach(model, mask_b, name="b")``); :meth:`set_active`
picks which apply (several: their sum), without copying anything. :meth:`DeltaHandle.merge`
folds a delta into the float base weight for inference, :meth:`DeltaHandle.unmerge` restores
the base bit for bit, :meth:`DeltaHandle.remove` takes it away. The base may be float32,
bfloat16, float16, torchao-quantized (a tensor-subclass weight: trained; merged only with
``merge(requantize=True)``, which reports the error it introduces, :mod:`.requantize`) or a
bitsandbytes 4-bit ``Linear4bit`` (NF4/FP4: trained through its own forward and input
gradient; the mask is over its logical (out, in) entries, drawn on the float model; merging
is refused, requantization being torchao-only).

Merged value (one definition everywhere, :func:`merged_weight_values`): at each selected entry
theta = (theta0 + v) computed in the values' dtype (float32; float64 over a float64 base) and
rounded once to the weight's dtype. That is what an in-place optimizer writes for the same
values: the float32 master copy theta0 + v of a 16-bit weight, rounded once; a float32 weight's
own float32 sum. :meth:`DeltaHandle.to_delta` records the same rounded values as ``tuned``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .._checks import logical_shape, reject_sharded, unwrap_compiled
from ..delta import BaseModelMismatchError, SparseDelta, base_fingerprint, register_attach
from ..delta import DeltaEntry as _Entry
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from .pretrained import read_folder, write_folder
from .requantize import RequantizeReport, check_requantizable, requantized_merge
from .slot import (
    SLOT,
    DeltaSlot,
    LayerDelta,
    MergedDelta,
    layer_kind,
    merged_weight_values,
    values_dtype,
)

__all__ = ["DeltaHandle", "attach", "base_parameters", "merged_weight_values"]


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` without the attached deltas' values: the base's."""
    return {n: p for n, p in unwrap_compiled(model).named_parameters()
            if f".{SLOT}." not in f".{n}"}


def _is_plain(weight: Tensor) -> bool:
    """A float tensor stored as itself (not a quantized tensor subclass)."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is torch.Tensor and weight.dtype.is_floating_point


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, DeltaSlot]]:
    return {n: (m, getattr(m, SLOT)) for n, m in model.named_modules()
            if isinstance(getattr(m, SLOT, None), DeltaSlot)}


class DeltaHandle:
    """One named delta attached to a model (returned by :func:`attach`)."""

    def __init__(self, model: nn.Module, name: str, layers: dict[str, str]) -> None:
        self.model, self.name = model, name
        self._layers = layers  # layer name -> weight parameter name
        self._removed = False

    # -- training -------------------------------------------------------------------------
    def _deltas(self) -> Iterator[tuple[str, nn.Module, DeltaSlot, LayerDelta]]:
        if self._removed:
            raise InvalidArgumentError(f"delta {self.name!r} was removed from its model")
        modules = dict(self.model.named_modules())
        for layer_name in self._layers:
            layer = modules[layer_name]
            slot = getattr(layer, SLOT)
            yield layer_name, layer, slot, slot.deltas[self.name]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(parameter name, values)`` for every weight (and bias) this delta covers; the
        values are 1-D of the parameter's k selected entries, row-major order."""
        for layer_name, _, _, delta in self._deltas():
            prefix = f"{layer_name}." if layer_name else ""
            yield prefix + "weight", delta.weight_values
            if delta.bias_values is not None:
                yield prefix + "bias", delta.bias_values

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable values, for any torch optimizer."""
        for _, p in self.named_parameters():
            yield p

    @property
    def num_values(self) -> int:
        """k: how many entries the delta trains."""
        return sum(p.numel() for p in self.parameters())

    def set_active(self, names: str | Iterable[str]) -> None:
        """Which deltas of the model apply in the forward (all of them, not only this one):
        one name, or several whose deltas are summed; ``[]`` runs the base alone."""
        names = [names] if isinstance(names, str) else list(names)
        slots = _slots(self.model)
        known = {n for _, s in slots.values() for n in s.deltas}
        unknown = sorted(set(names) - known)
        if unknown:
            raise InvalidArgumentError(f"set_active: no delta named {unknown}; attached: "
                                       f"{sorted(known)}")
        for _, slot in slots.values():
            slot.active = [n for n in names if n in slot.deltas]

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the deltas that apply (in the order given to :meth:`set_active`)."""
        found: dict[str, None] = {}
        for _, slot in _slots(self.model).values():
            found.update(dict.fromkeys(slot.active))
        return tuple(found)

    # -- merging --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(slot.is_merged(self.name) for _, _, slot, _ in self._deltas())

    @torch.no_grad()
    def merge(self, *, requantize: bool = False) -> dict[str, RequantizeReport]:
        """Fold this delta into the base weights (:func:`merged_weight_values`); the forward
        then skips it. A float weight takes theta0 + v exactly. A quantized weight cannot:
        refused unless ``requantize=True``, which dequantizes it, adds the delta and quantizes
        again with the weight's own scheme (:mod:`.requantize`). Returns the error each
        requantized layer took, by layer name (empty when no layer was quantized). The
        original quantized weight is kept aside for :meth:`unmerge` (one quantized weight of
        memory per layer). Nothing changes when any layer is refused."""
        if self.merged:
            raise InvalidArgumentError(f"delta {self.name!r} is already merged")
        parts = list(self._deltas())
        quantized = [n for n, layer, _, _ in parts if not _is_plain(layer.weight)]
        if quantized and not requantize:
            raise InvalidArgumentError(
                f"cannot merge delta {self.name!r} exactly: the weights of layers {quantized} "
                f"are quantized (their stored values cannot hold theta0 + v); pass "
                f"requantize=True to quantize the merged weights again (the error is "
                f"reported), keep the delta attached, or dequantize the base first")
        for n, layer, _, _ in parts:
            if n in quantized:
                check_requantizable(n, layer.weight)
        reports = {}
        for n, layer, slot, delta in parts:
            if n in quantized:
                saved_w, requantized = layer.weight, True
                layer.weight, reports[n] = requantized_merge(
                    n, saved_w, delta.weight_indices, delta.weight_values)
            else:
                requantized = False
                saved_w = _write(layer.weight, delta.weight_indices, delta.weight_values)
            saved_b = None
            if delta.bias_values is not None:
                saved_b = _write(layer.bias, delta.bias_indices[None], delta.bias_values)
            slot.merged.append(MergedDelta(self.name, saved_w, saved_b, requantized))
        return reports

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base values this delta's :meth:`merge` replaced, bit for bit (a
        requantized weight: the original quantized Parameter itself). Deltas merged later over
        the same layers must be unmerged first."""
        parts = list(self._deltas())
        if not any(slot.is_merged(self.name) for _, _, slot, _ in parts):
            raise InvalidArgumentError(f"delta {self.name!r} is not merged")
        late = sorted({slot.merged[-1].name for _, _, slot, _ in parts
                       if slot.merged and slot.merged[-1].name != self.name})
        if late:
            raise InvalidArgumentError(
                f"unmerge {late} first: they were merged after {self.name!r} on the same layers")
        for _, layer, slot, delta in parts:
            record = slot.merged.pop()
            if record.requantized:
                layer.weight = record.weight
            else:
                _put(layer.weight, delta.weight_indices, record.weight)
            if record.bias is not None:
                _put(layer.bias, delta.bias_indices[None], record.bias)

    def remove(self) -> None:
        """Take this delta off the model (unmerging it first); the last delta removed also
        takes the slots and hooks away and restores ``requires_grad`` of the base."""
        if self._removed:
            return
        if self.merged:
            self.unmerge()
        for _, layer, slot, _ in list(self._deltas()):
            slot.drop(self.name)
            if not slot.deltas:
                slot.detach_hook(layer)
                delattr(layer, SLOT)
        self._removed = True
        if not _slots(self.model):
            flags = getattr(self.model, "_sparsetune_requires_grad", {})
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            self.model.__dict__.pop("_sparsetune_requires_grad", None)

    # -- files ----------------------------------------------------------------------------
    @torch.no_grad()
    def to_delta(self, *, method: str = "attach") -> SparseDelta:
        """This delta as a :class:`~sparsetune.SparseDelta` over the frozen base: ``base`` the
        base values at the selected entries, ``tuned`` :func:`merged_weight_values` (so
        ``to_delta().apply_to(base)`` equals :meth:`merge`), the base's fingerprint."""
        if self.merged:
            raise InvalidArgumentError(f"unmerge delta {self.name!r} before to_delta()")
        params = base_parameters(self.model)
        unplain = [n for n, p in params.items() if not _is_plain(p)]
        if unplain:
            raise InvalidArgumentError(
                f"to_delta needs float base weights; {unplain[:3]} are quantized")
        entries = {}
        for name, values in self.named_parameters():
            p = params[name]
            index = self._flat_index(name)
            base = p.detach().reshape(-1)[index]
            tuned = merged_weight_values(base, values.detach())
            entries[name] = _Entry(tuple(p.shape), index, base.clone(), tuned)
        return SparseDelta(entries, base_fingerprint(params), method,
                           {"attached_as": self.name})

    def save_pretrained(
        self, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None
    ) -> Path:
        """Save this delta as a peft-style folder (:mod:`.pretrained`): ``adapter_config.json``,
        the :class:`~sparsetune.SparseDelta` file of :meth:`to_delta` and the trained values;
        :meth:`from_pretrained` loads it back. ``base_model_name_or_path`` defaults to the
        model's ``name_or_path`` (transformers models), else None. Returns the folder.

        Example::

            handle = st.attach(model, mask, name="task")
            ...                                   # train handle.parameters()
            handle.save_pretrained("task_delta")
            again = st.DeltaHandle.from_pretrained(fresh_base_model, "task_delta")
        """
        values = {n: v.detach() for n, v in self.named_parameters()}
        source = base_model_name_or_path or getattr(self.model, "name_or_path", None) or None
        total = sum(p.numel() for p in base_parameters(self.model).values())
        return write_folder(folder, self.to_delta(), values, name=self.name,
                            target_modules=list(self._layers), num_base_entries=total,
                            base_model_name_or_path=None if source is None else str(source))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, folder: str | os.PathLike, name: str | None = None, *,
        check_base: bool = True,
    ) -> DeltaHandle:
        """Attach the delta of a :meth:`save_pretrained` folder to ``model``, its base (the
        fingerprint is checked: :class:`~sparsetune.BaseModelMismatchError` otherwise), under
        ``name`` (default: the saved name), with the saved values exactly: the model computes
        bit for bit what the saved one did."""
        config, delta, values = read_folder(folder)
        handle = _attach_delta(model, delta, config["name"] if name is None else name,
                               check_base)
        with torch.no_grad():
            for pname, p in handle.named_parameters():
                p.copy_(values[pname].to(p.device, p.dtype))
        return handle

    def _flat_index(self, param_name: str) -> Tensor:
        layer_name, _, which = param_name.rpartition(".")
        delta = getattr(dict(self.model.named_modules())[layer_name], SLOT).deltas[self.name]
        if which == "bias":
            return delta.bias_indices
        shape = getattr(dict(self.model.named_modules())[layer_name], SLOT).shape
        return delta.weight_indices[0] * shape[1] + delta.weight_indices[1]

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._layers)} layers, k={self.num_values}"
        return f"DeltaHandle({self.name!r}, {state})"


def _write(param: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Write merged values at ``indices`` ((2, k) pairs or (1, k) for a bias); return the base
    values they replaced."""
    where = tuple(indices)
    saved = param.data[where].clone()
    param.data[where] = merged_weight_values(saved, values.detach().to(param.device))
    return saved


def _put(param: Tensor, indices: Tensor, values: Tensor) -> None:
    param.data[tuple(indices)] = values.to(param.device)


def attach(
    model: nn.Module, mask: Mask, name: str = "default", *, active: bool = True
) -> DeltaHandle:
    """Give every covered layer whose weight ``mask`` touches a trainable sparse delta.

    Args:
        model: the base model; every parameter is frozen (``requires_grad=False``; restored
            when the last delta is removed) and none is ever written (except by ``merge``).
        mask: selected entries by parameter name (``model.named_parameters()``): the weights
            of ``nn.Linear``, transformers ``Conv1D`` and ``nn.Embedding`` layers, and the
            biases of the Linear/Conv1D layers. Any other selected parameter is an error.
        name: the delta's name (a Python identifier), unique on the model.
        active: whether the new delta applies at once (added to the active ones).

    Returns:
        a :class:`DeltaHandle`; ``handle.parameters()`` go to the optimizer.
    """
    model = unwrap_compiled(model)
    reject_sharded(model, "st.attach", "attach before fully_shard is not supported either; "
                   "train the shards in place with SparseAdamW or SparseSGD")
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidArgumentError(f"name must be a Python identifier, got {name!r}")
    existing = {n for _, s in _slots(model).values() for n in s.deltas}
    if name in existing:
        raise InvalidArgumentError(f"a delta named {name!r} is already attached")
    params = base_parameters(model)
    mask.check(model)
    modules = dict(model.named_modules())
    layers, refused = {}, []
    for pname in mask:
        selected = mask[pname]
        if pname not in params:
            continue
        if not bool(selected.any()):
            continue
        layer_name, _, which = pname.rpartition(".")
        layer = modules.get(layer_name)
        kind = None if layer is None else layer_kind(layer)
        if kind is None or which not in ("weight", "bias") or (kind == "embedding"
                                                               and which == "bias"):
            refused.append(pname)
            continue
        layers.setdefault(layer_name, {})[which] = selected
    if refused:
        raise ParameterMismatchError(
            f"attach covers the weights of nn.Linear, transformers Conv1D and nn.Embedding "
            f"and the biases of the first two; the mask also selects {refused}: leave them "
            f"out of the mask (Mask - Mask.from_names(...)) or train them in place")
    if not layers:
        raise InvalidArgumentError("the mask selects no entry of a covered layer")
    if not any(isinstance(getattr(m, SLOT, None), DeltaSlot) for m in modules.values()):
        model.__dict__["_sparsetune_requires_grad"] = {
            n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for layer_name, parts in layers.items():
        layer = modules[layer_name]
        weight = layer.weight
        w_sel = parts.get("weight", torch.zeros(logical_shape(weight), dtype=torch.bool))
        w_idx = torch.nonzero(w_sel.to(weight.device)).t().contiguous()
        b_sel = parts.get("bias")
        b_idx = None if b_sel is None else torch.nonzero(b_sel.to(weight.device))[:, 0]
        slot = getattr(layer, SLOT, None)
        if slot is None:
            slot = DeltaSlot(layer, layer_kind(layer))
            setattr(layer, SLOT, slot)
        slot.add(name, LayerDelta(w_idx, b_idx, values_dtype(weight)))
        if not active:
            slot.active.remove(name)
    return DeltaHandle(model, name, {n: "weight" for n in layers})


def _attach_delta(model: nn.Module, delta: SparseDelta, name: str, check_base: bool
                  ) -> DeltaHandle:
    """:meth:`SparseDelta.attach_to`: the delta's support attached, values set to its dtheta."""
    model = unwrap_compiled(model)
    params = base_parameters(model)
    if check_base:
        found = base_fingerprint(params)
        if found != delta.base_fingerprint:
            raise BaseModelMismatchError(
                f"this delta was extracted from another base model (fingerprint "
                f"{delta.base_fingerprint[:12]}..., the model has {found[:12]}...)")
    handle = attach(model, delta.support(), name)
    with torch.no_grad():
        for pname, values in handle.named_parameters():
            e = delta.entries[pname]
            values.copy_(e.delta64().to(values.device, values.dtype))
    return handle


register_attach(_attach_delta)
