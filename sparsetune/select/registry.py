"""One interface over every selection method: ``select(model, method, density, ...)``.

Each name maps to a method's config class (:mod:`sparsetune.select.methods`): its options,
checked before any work, its flags (density, data, burn-in training, all-reducible statistic)
and how it builds the mask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .._loss import LossFn, transformers_loss
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ._data import trainable
from .methods import BUILTIN, MethodConfig, MethodInfo, builder_config

__all__ = [
    "METHODS", "MethodInfo", "method_info", "method_options", "method_spec", "register_method",
    "select", "target_names",
]

_REGISTRY: dict[str, type[MethodConfig]] = {spec.name: spec for spec in BUILTIN}


def register_method(
    name: str, info: MethodInfo, builder: Callable[..., Mask], options: Iterable[str] = ()
) -> None:
    """Add a selection method (integrations use this, e.g. peft's ``lora`` and ``adapter``).

    ``builder(model, density, scope, always_train, *, data, loss_fn, seed, **options) -> Mask``;
    ``options`` are the option names it takes.
    """
    if name in _REGISTRY:
        raise InvalidArgumentError(f"method {name!r} is already registered")
    _REGISTRY[name] = builder_config(info, builder, options)


class _MethodNames(Sequence[str]):
    """The registered method names, always current (integrations may add some)."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(_REGISTRY)[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


METHODS: Sequence[str] = _MethodNames()


def method_spec(method: str) -> type[MethodConfig]:
    """The config class of ``method``: its options (fields, checked on construction) and flags.

    ``method_spec(m).trains_burn_in`` says whether selection runs training steps,
    ``.count_option`` which option counts the batches read (``"num_batches"``, ``"steps"`` or
    None), ``.uses_data``, ``.uses_density``, ``.all_reducible``.
    """
    if method not in _REGISTRY:
        raise InvalidArgumentError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    return _REGISTRY[method]


def method_options(method: str) -> frozenset[str]:
    """The option names ``select(model, method, ...)`` accepts for ``method``."""
    return method_spec(method).option_names()


def method_info(method: str) -> MethodInfo:
    """Family, needs and description of ``method``."""
    return method_spec(method).info()


def select(
    model: nn.Module,
    method: str,
    density: float | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    scope: str = "global",
    seed: int = 0,
    always_train: Iterable[str] = (),
    targets: str | Iterable[str] | None = None,
    **options: Any,
) -> Mask:
    r"""Choose the entries to fine-tune with ``method`` (one of :data:`METHODS`).

    Args:
        model: the pretrained model; its weights and modes are left exactly as found.
        method: a name from ``METHODS``.
        density: p in (0, 1] for methods that take a budget (ignored by rule methods such as
            ``bitfit`` and ``names``, whose density is what the rule gives; passing one to them
            is an error rather than silently ignored).
        data, loss_fn: batches and ``loss_fn(model, batch) -> scalar`` for data-driven methods;
            ``loss_fn`` defaults to ``model(**batch).loss``.
        scope: ``"global"`` (the paper's theorem) or ``"per_tensor"`` (the authors' code).
        seed: seed of random choices (random masks, dropout in burn-in steps).
        always_train: parameter names trained in full and left out of the budget.
        targets: regular expression(s) over parameter names (``re.search``), like peft's
            ``target_modules``: only matching parameters receive entries, e.g.
            ``r"attention\.self\.(query|value)\.weight$"``. The budget is still p of the whole
            model (``mask.density == p``). Methods that score entries only (not rules).
        options: method options, the fields of the method's config class
            (:func:`method_spec`), all checked before any work (``num_batches``,
            ``max_grad_norm``, ``steps``, ``lr``, ``burn_in_steps``, ``include``, ``exclude``,
            ``l0_weight``, ``init_log_alpha``, ``progress``; for ``sam_curvature``
            also ``curvature_method``, ``num_samples``, ``curvature_data``, ``curvature``,
            ``floor``, ``floor_fraction``: see :func:`sparsetune.select.sam_curvature_scores`;
            for ``sam`` and ``sam_curvature`` also ``head_warmup_steps`` (default 0) and
            ``head_warmup_lr`` (default 1e-2): first train the ``always_train`` parameters
            (the task head) alone for that many AdamW steps on ``data`` (a linear probe), then
            score; the model is left as found).
    """
    spec = method_spec(method)
    spec.refuse_if_per_step()
    always = [always_train] if isinstance(always_train, str) else list(always_train)
    names = {n for n, _ in trainable(model)}
    unknown = sorted(set(always) - names)
    if unknown:
        raise ParameterMismatchError(
            f"always_train names parameters the model lacks (or that do not require grad): "
            f"{unknown}"
        )
    if spec.uses_density and density is None:
        raise InvalidArgumentError(f"method {method!r} needs a density in (0, 1]")
    if not spec.uses_density and density is not None:
        raise InvalidArgumentError(
            f"method {method!r} selects by rule and takes no density (got density={density!r})"
        )
    config = spec.from_options(options)
    if config.needs_data:
        if data is None:
            raise InvalidArgumentError(f"method {method!r} needs data= (an iterable of batches)")
        loss_fn = loss_fn or transformers_loss
    chosen = None
    if targets is not None:
        if not spec.takes_targets:
            takes = sorted(n for n, c in _REGISTRY.items() if c.takes_targets)
            raise InvalidArgumentError(
                f"method {method!r} does not take targets; methods that do: {takes}"
            )
        chosen = target_names(model, targets, exclude=always)
    return config.build(model, density, scope, always, data=data, loss_fn=loss_fn, seed=seed,
                        targets=chosen)


def target_names(
    model: nn.Module, patterns: str | Iterable[str], *, exclude: Iterable[str] = ()
) -> list[str]:
    """Names of ``model``'s trainable parameters matching any regex in ``patterns``
    (``re.search``), minus ``exclude``; a pattern that is invalid or matches nothing raises."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise InvalidArgumentError("targets needs at least one pattern")
    names = [n for n, _ in trainable(model)]
    skip = set(exclude)
    found: list[str] = []
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise InvalidArgumentError(f"targets: invalid pattern {pattern!r}: {err}") from None
        hits = [n for n in names if compiled.search(n)]
        if not hits:
            raise ParameterMismatchError(
                f"targets: pattern {pattern!r} matches no trainable parameter; names look "
                f"like {names[:4]}"
            )
        found.extend(n for n in hits if n not in skip and n not in found)
    if not found:
        raise InvalidArgumentError(
            f"targets {patterns} match only always_train parameters: nothing left to choose"
        )
    return [n for n in names if n in found]
