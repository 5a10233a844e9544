"""``targets=``: which parameters may receive entries, in regex or peft's vocabulary.

Each item of ``targets`` (one string or a list) is read by this rule:

- ``"all-linear"`` (any case, as peft): the weight of every ``nn.Linear`` and transformers
  ``Conv1D`` but the output head (``model.get_output_embeddings()``, where the model has one).
- a plain identifier, ``[A-Za-z_][A-Za-z0-9_]*`` (no dot, no regex metacharacter), e.g.
  ``"q_proj"``: a module-name suffix, peft's ``target_modules`` rule for a list: every module
  whose name is the key or ends with ``"." + key``. It covers the module's own ``weight``, the
  tensor LoRA adapts (not its bias, nor the weights of modules inside it).
- anything else: a regular expression searched (``re.search``) in parameter names, e.g.
  ``r"attention\\.self\\.(query|value)\\.weight$"``; it covers whatever it matches, biases too.

So a LoRA user's ``target_modules=["q_proj", "v_proj"]`` or ``"all-linear"`` carries over
unchanged. A dotted module path (peft also accepts ``"self_attn.q_proj"``) is read as a regex,
which then covers the bias too: write ``r"self_attn\\.q_proj\\.weight$"`` for the weight alone.
A tied weight (GPT-2's ``lm_head`` is ``transformer.wte``) is one parameter, under the name
``named_parameters()`` gives it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from torch import nn

from .._checks import unwrap_compiled
from ..errors import InvalidArgumentError, ParameterMismatchError

__all__ = ["ALL_LINEAR", "target_names"]

#: peft's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear,)
    if "transformers" in sys.modules:  # only a transformers model holds a Conv1D
        from transformers.pytorch_utils import Conv1D

        types += (Conv1D,)
    return types


def _own_weight(module: nn.Module):
    weight = module._parameters.get("weight")
    return weight if weight is not None and weight.requires_grad else None


def _all_linear(model: nn.Module, names: dict[int, str]) -> list[str]:
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        head = model.get_output_embeddings()
    found = []
    for module in model.modules():
        weight = _own_weight(module)
        if module is not head and isinstance(module, _linear_types()) and weight is not None:
            found.append(names[id(weight)])
    if not found:
        raise ParameterMismatchError(
            f"targets: {ALL_LINEAR!r} matches no trainable parameter: the model has no trainable "
            f"nn.Linear or Conv1D layer but its output head"
        )
    return found


def _module_suffix(model: nn.Module, key: str, names: dict[int, str]) -> list[str]:
    modules = [(n, m) for n, m in model.named_modules() if n == key or n.endswith("." + key)]
    found = [names[id(w)] for _, m in modules if (w := _own_weight(m)) is not None]
    if found:
        return found
    what = f"targets: {key!r} (a module-name suffix, peft's rule) matches no trainable parameter"
    if not modules:
        examples = [n for n, _ in model.named_modules() if n][:4]
        raise ParameterMismatchError(
            f"{what}: no module is named {key!r} or ends with '.{key}'; module names look like "
            f"{examples} (a name with a dot or a regex metacharacter is a regex over parameter "
            f"names)"
        )
    kinds = sorted({type(m).__name__ for _, m in modules})
    raise ParameterMismatchError(
        f"{what}: the {len(modules)} modules it names ({kinds}, e.g. {modules[0][0]!r}) have no "
        f"trainable weight of their own; name their layers, or use a regex over parameter names "
        f"such as r'{key}\\.'"
    )


def _regex(pattern: str, names: list[str]) -> list[str]:
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as err:
        raise InvalidArgumentError(f"targets: invalid pattern {pattern!r}: {err}") from None
    hits = [n for n in names if compiled.search(n)]
    if not hits:
        raise ParameterMismatchError(
            f"targets: pattern {pattern!r} matches no trainable parameter; names look like "
            f"{names[:4]}"
        )
    return hits


def target_names(
    model: nn.Module, targets: str | Iterable[str], *, exclude: Iterable[str] = ()
) -> list[str]:
    """Names of ``model``'s trainable parameters that ``targets`` covers (see the module's
    rule: ``"all-linear"``, module-name suffixes, regexes over parameter names), minus
    ``exclude``, in the order of ``named_parameters()``. An item that is invalid or matches
    nothing raises, naming it.
    """
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise InvalidArgumentError("targets needs at least one pattern")
    model = unwrap_compiled(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    by_id = {id(p): n for n, p in params}
    found: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(
                f"targets: each item must be a string (a module name or a regex), got "
                f"{type(item).__name__} {item!r}"
            )
        if item.lower() == ALL_LINEAR:
            found.update(_all_linear(model, by_id))
        elif _IDENTIFIER.fullmatch(item):
            found.update(_module_suffix(model, item, by_id))
        else:
            found.update(_regex(item, names))
    skip = set(exclude)
    chosen = [n for n in names if n in found and n not in skip]
    if not chosen:
        raise InvalidArgumentError(
            f"targets {items} match only always_train parameters: nothing left to choose"
        )
    return chosen
