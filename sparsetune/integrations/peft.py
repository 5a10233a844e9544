"""peft adapters and LoRA as sparse fine-tuning of an "equivalent model" (theory/ E1).

A peft model adds modules to the base model; with zero-initialised adapters (LoRA's B = 0,
IA3's vectors = 1) the wrapped model computes exactly the base model's function, so it is an
*equivalent model* of the base, and training only the added entries is sparse fine-tuning of it
(Fu et al., AAAI 2023, Sec. 3). This module gives the mask of those added entries, and registers
two selection methods (importing ``sparsetune`` registers them; peft itself is imported only
when a mask is built):

* ``"lora"``: the parameters of peft's LoRA layers for the active adapters (``lora_A``,
  ``lora_B``, ``lora_embedding_A/B``, DoRA's ``lora_magnitude_vector``; AdaLoRA's layers too).
* ``"adapter"``: the parameters of *every* peft tuner layer for the active adapters, whatever
  the method (LoRA, IA3, LoHa, LoKr, OFT, BOFT, VeRA, trainable tokens, ...): peft's own list of
  a layer's trainable adapter weights (``adapter_layer_names``). Bottleneck adapters
  (Houlsby et al.) are not in peft; prompt-learning methods (prefix or prompt tuning) add no
  layer, and do not compute the base function at initialisation, so they are refused.

Entries of ``modules_to_save`` (peft's trained copy of the task head) are *always trained*:
fully selected and counted apart from the budget, so ``mask.num_selected`` is the number of
added entries and ``mask.num_trainable`` is peft's trainable count. Every other parameter is
frozen. A parameter that requires grad but is neither added nor a ``modules_to_save`` copy
(``LoraConfig(bias="all")`` makes the base biases trainable) is an error unless it is named in
``always_train``: the mask would otherwise silently freeze it.

Example::

    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8))
    mask = sparsetune.select(peft_model, "lora")
    opt = sparsetune.SparseAdamW(peft_model, mask, lr=1e-3)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..delta import SparseDelta
from ..errors import InvalidArgumentError
from ..mask import Mask
from ..select import METHODS, MethodInfo, register_method
from ._deps import require

__all__ = ["ADAPTER_KINDS", "adapter_mask", "added_parameter_names", "lora_delta"]

#: What ``kind`` may be: LoRA layers only, or the layers of every peft tuner.
ADAPTER_KINDS = ("lora", "adapter")
_PIN = "peft==0.21.2"


def added_parameter_names(model: nn.Module, kind: str = "adapter") -> tuple[list[str], list[str]]:
    """Names of the parameters a peft tuner added, and of its ``modules_to_save`` copies.

    Parameters are matched by identity through peft's layer objects (never by parsing names),
    for the active adapters of each layer only. Returns ``(added, head)`` in
    ``model.named_parameters()`` order; ``head`` lists the trainable parameters of
    ``modules_to_save`` copies.
    """
    if kind not in ADAPTER_KINDS:
        raise InvalidArgumentError(f"kind must be one of {list(ADAPTER_KINDS)}, got kind={kind!r}")
    require("peft", _PIN, f"selection method {kind!r}")
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    layer_type = LoraLayer if kind == "lora" else BaseTunerLayer
    added_ids: set[int] = set()
    head_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, layer_type):
            added_ids |= _adapter_parameter_ids(module)
        elif isinstance(module, ModulesToSaveWrapper):
            head_ids |= _adapter_parameter_ids(module)
    named = list(model.named_parameters())
    added = [n for n, p in named if id(p) in added_ids]
    head = [n for n, p in named if id(p) in head_ids and p.requires_grad]
    return added, head


def _adapter_parameter_ids(layer: nn.Module) -> set[int]:
    """ids of the parameters under ``layer.adapter_layer_names`` for the active adapters."""
    ids: set[int] = set()
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for adapter in layer.active_adapters:
            if adapter not in holder:
                continue
            item = holder[adapter]
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            ids |= {id(p) for p in params}
    return ids


def adapter_mask(
    model: nn.Module, kind: str = "adapter", *, always_train: Iterable[str] = ()
) -> Mask:
    """Mask of exactly the entries peft added to ``model`` (theory/ E1 on the equivalent model).

    Args:
        model: a peft model (``peft.get_peft_model(...)``) or a module with peft tuner layers.
        kind: ``"lora"`` (LoRA layers) or ``"adapter"`` (every peft tuner layer).
        always_train: further parameter names trained in full; ``modules_to_save`` copies are
            always trained anyway.

    Returns a mask over every parameter of ``model``: the added parameters fully selected
    (``num_selected`` = their entry count), ``modules_to_save`` copies always trained, every
    other entry frozen.
    """
    added, head = added_parameter_names(model, kind)
    if not added:
        what = "LoRA layers" if kind == "lora" else "peft tuner layers (LoRA, IA3, LoHa, ...)"
        raise InvalidArgumentError(
            f"method {kind!r}: {type(model).__name__} has no {what} with an active adapter; "
            f"wrap the base model with peft.get_peft_model(model, config) first (prompt-learning "
            f"configs add no layer and are not equivalent models of the base)"
        )
    always = [always_train] if isinstance(always_train, str) else list(always_train)
    chosen = set(added)
    named = list(model.named_parameters())
    unknown = sorted(set(always) - {n for n, _ in named})
    if unknown:
        raise InvalidArgumentError(f"always_train names parameters the model lacks: {unknown}")
    covered = chosen | set(head) | set(always)
    stray = [n for n, p in named if p.requires_grad and n not in covered]
    if stray:
        raise InvalidArgumentError(
            f"method {kind!r}: {len(stray)} parameters require grad but were not added by peft "
            f"(e.g. LoraConfig(bias='all') makes base biases trainable): {stray[:8]}"
            f"{' ...' if len(stray) > 8 else ''}; the mask would freeze them. Name them in "
            f"always_train=, or set requires_grad=False on them"
        )
    bits = {
        n: torch.full(p.shape, n in chosen, dtype=torch.bool, device=p.device) for n, p in named
    }
    return Mask(bits, always_train=[*head, *always])


def lora_delta(model: nn.Module) -> SparseDelta:
    """LoRA's merged change of the base weights, as a :class:`~sparsetune.SparseDelta`.

    The reverse view of :func:`adapter_mask`: what the trained LoRA adapters do to the base
    model, Delta W = B A times the scaling (peft's ``get_delta_weight``), for the active
    adapters. The delta is keyed by the *base* model's parameter names (those of the model
    ``merge_and_unload()`` returns), found through peft's layer objects, and holds W0 and
    W0 + Delta W computed in the weight's dtype exactly as ``merge_and_unload()`` computes them,
    so ``lora_delta(peft_model).apply_to(base_model)`` equals the merged model's weights bit for
    bit. The support is every entry the merge changes (LoRA's Delta W is dense: at rank r it
    moves almost every entry of each adapted weight). ``modules_to_save`` copies (a trained
    head) are not merged by peft and are not in the delta; DoRA and ``lora_bias`` adapters are
    refused. The model is not changed.
    """
    require("peft", _PIN, "lora_delta")
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    base, tuned = {}, {}
    for name, param, layer in _base_named_parameters(root):
        base[name] = param.detach()
        if isinstance(layer, LoraLayer) and param is layer.get_base_layer().weight:
            value = param.detach().clone()
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
                    continue
                if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
                    raise InvalidArgumentError(
                        f"lora_delta: adapter {adapter!r} of {name!r} uses DoRA or lora_bias, "
                        f"whose merge also rescales the weight or changes the bias; only plain "
                        f"LoRA (W0 + scaling B A) is supported"
                    )
                value += layer.get_delta_weight(adapter).detach().to(value.dtype)
            tuned[name] = value
    if not tuned:
        raise InvalidArgumentError(f"{type(model).__name__} has no LoRA layer with an adapter")
    state = {**base, **tuned}
    changed = {n: state[n] != base[n] for n in base}
    return SparseDelta.extract(_ParameterTree(state), base, Mask(changed), method="lora")


def _base_named_parameters(module: nn.Module, prefix: str = "", seen: set[int] | None = None):
    """``(name, parameter, tuner layer or None)`` named as in the model ``unload()`` returns."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    seen = set() if seen is None else seen
    if isinstance(module, BaseTunerLayer):
        for name, p in module.get_base_layer().named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p, module
        return
    if isinstance(module, AuxiliaryTrainingWrapper):
        yield from _base_named_parameters(module.original_module, prefix, seen)
        return
    for name, p in module.named_parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield prefix + name, p, None
    for name, child in module.named_children():
        yield from _base_named_parameters(child, f"{prefix}{name}.", seen)


class _ParameterTree(nn.Module):
    """A module whose ``named_parameters()`` are the given dotted names (for SparseDelta)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(leaf, nn.Parameter(t, requires_grad=False))


def _build(kind: str):
    def builder(model, density, scope, always_train, **_: Any) -> Mask:
        return adapter_mask(model, kind, always_train=always_train)

    return builder


for _kind, _text in (
    ("lora", "peft LoRA: exactly the entries of the active LoRA adapters (lora_A, lora_B, ...)"),
    ("adapter", "peft adapters: the entries every active peft tuner layer added (LoRA, IA3, ...)"),
):
    if _kind not in METHODS:  # importing this module twice must not fail
        register_method(_kind, MethodInfo(_kind, "rule", False, False, _text), _build(_kind))
