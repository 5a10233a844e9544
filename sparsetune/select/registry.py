"""One interface over every selection method: ``select(model, method, density, ...)``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from .._loss import LossFn, transformers_loss
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ._data import trainable
from .projection import diff_pruning_scores, finetuned_values, fisher_scores, lt_sft_scores
from .rules import bitfit_mask, magnitude_scores, names_mask, random_scores
from .sam import sam_curvature_scores, sam_scores

__all__ = [
    "METHODS", "MethodInfo", "method_info", "method_options", "register_method", "select",
    "target_names",
]


@dataclass(frozen=True)
class MethodInfo:
    """What a selection method is and what it needs."""

    name: str
    family: str  # "random", "rule", "projection", "sam" or "optimizer"
    needs_data: bool
    uses_density: bool
    description: str
    optimizer: str | None = None  # for per-step methods: the optimizer class that implements it


_Builder = Callable[..., Mask]
_REGISTRY: dict[str, tuple[MethodInfo, _Builder]] = {}


def _register(name: str, family: str, needs_data: bool, uses_density: bool, description: str):
    def decorate(builder: _Builder) -> _Builder:
        _REGISTRY[name] = (MethodInfo(name, family, needs_data, uses_density, description), builder)
        return builder

    return decorate


@_register("random", "random", False, True, "a fixed random mask (seeded)")
def _random(model, density, scope, always_train, seed, targets=None, **_):
    return Mask.top_k(random_scores(model, seed=seed), density, scope, always_train=always_train,
                      targets=targets)


@_register("bitfit", "rule", False, False, "bias terms only (BitFit); density is what it gives")
def _bitfit(model, density, scope, always_train, **_):
    return bitfit_mask(model, always_train=always_train)


@_register("names", "rule", False, False, "regex include/exclude rules over parameter names")
def _names(model, density, scope, always_train, include=(), exclude=(), **_):
    return names_mask(model, include, exclude, always_train=always_train)


@_register("magnitude", "rule", False, True,
           "largest |theta| (MagPruning), optionally after a reset full fine-tuning burn-in")
def _magnitude(model, density, scope, always_train, data=None, loss_fn=None, seed=0,
               burn_in_steps=0, lr=1e-4, progress=True, targets=None, **_):
    if burn_in_steps:
        if data is None:
            raise InvalidArgumentError("magnitude with burn_in_steps > 0 needs data=")
        values = finetuned_values(model, loss_fn, data, steps=burn_in_steps, lr=lr, seed=seed,
                                  progress=progress)
        scores = {n: v.abs() for n, v in values.items()}
    else:
        scores = magnitude_scores(model)
    return Mask.top_k(scores, density, scope, always_train=always_train,
                      targets=targets)


@_register("child_pruning", "projection", True, True,
           "Child-Tuning-D: Fisher information (sum of squared clipped batch gradients) top-k")
def _child_pruning(model, density, scope, always_train, data, loss_fn, num_batches=None,
                   max_grad_norm=1.0, progress=True, targets=None, **_):
    scores = fisher_scores(model, loss_fn, data, num_batches=num_batches,
                           max_grad_norm=max_grad_norm, progress=progress)
    return Mask.top_k(scores, density, scope, always_train=always_train,
                      targets=targets)


@_register("lt_sft", "projection", True, True,
           "LT-SFT-style: full fine-tuning for N steps, keep the most changed entries, reset")
def _lt_sft(model, density, scope, always_train, data, loss_fn, seed=0, steps=100, lr=1e-4,
            progress=True, targets=None, **_):
    scores = lt_sft_scores(model, loss_fn, data, steps=steps, lr=lr, seed=seed, progress=progress)
    return Mask.top_k(scores, density, scope, always_train=always_train,
                      targets=targets)


@_register("diff_pruning", "projection", True, True,
           "DiffPruning: hard-concrete L0 gates over a diff vector, then top-k gate logits")
def _diff_pruning(model, density, scope, always_train, data, loss_fn, seed=0, steps=100, lr=1e-3,
                  l0_weight=1e-4, init_log_alpha=1.0, progress=True, targets=None, **_):
    scores = diff_pruning_scores(model, loss_fn, data, steps=steps, lr=lr, l0_weight=l0_weight,
                                 init_log_alpha=init_log_alpha, seed=seed, progress=progress)
    return Mask.top_k(scores, density, scope, always_train=always_train,
                      targets=targets)


@_register("sam", "sam", True, True,
           "SAM, practical variant: largest squared sum of clipped batch gradients at theta0")
def _sam(model, density, scope, always_train, data, loss_fn, num_batches=None, max_grad_norm=1.0,
         progress=True, targets=None, seed=0, head_warmup_steps=0, head_warmup_lr=1e-2, **_):
    def scores():
        return sam_scores(model, loss_fn, data, num_batches=num_batches,
                          max_grad_norm=max_grad_norm, progress=progress)

    return Mask.top_k(
        _after_head_warmup(model, always_train, data, loss_fn, seed, head_warmup_steps,
                           head_warmup_lr, progress, scores),
        density, scope, always_train=always_train, targets=targets,
    )


def _after_head_warmup(model, always_train, data, loss_fn, seed, steps, lr, progress, score):
    """``score()`` after ``steps`` AdamW steps on the always-trained parameters (the task head)
    alone, body frozen; the model is restored afterwards. With a randomly initialised head, the
    gradient at theta0 depends on that draw (benchmarks/README.md, quality: ``sam_probe``)."""
    if steps is None or steps == 0:
        return score()
    check_int("head_warmup_steps", steps)
    if not always_train:
        raise InvalidArgumentError(
            "head_warmup_steps trains the always_train parameters (the task head) alone before "
            "scoring, but always_train is empty: name the head, e.g. always_train="
            "['classifier.weight', 'classifier.bias']"
        )
    if iter(data) is data:
        raise InvalidArgumentError(
            f"head_warmup_steps reads data twice (the head warm-up, then the scores), but data "
            f"is a one-shot iterator ({type(data).__name__}): pass a list or a DataLoader"
        )
    # finetuned_values restores the model; only the head is then swapped in and back out.
    trained = finetuned_values(model, loss_fn, data, steps=steps, lr=lr, seed=seed,
                               progress=progress, only=always_train)
    head = {n: p for n, p in model.named_parameters() if n in trained}
    initial = {n: p.detach().clone() for n, p in head.items()}
    try:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(trained[name])
        return score()
    finally:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(initial[name])


_PER_EXAMPLE = ("ggn", "ggn_mc", "empirical_fisher")


@_register("sam_curvature", "sam", True, True,
           "SAM, exact criterion: largest g_i^2 / max(h_i, floor), h a Hessian-diagonal estimate")
def _sam_curvature(model, density, scope, always_train, data, loss_fn, seed=0, targets=None,
                   **options):
    if loss_fn is transformers_loss and options.get("curvature_method") in _PER_EXAMPLE:
        from ..curvature import OutputLoss

        loss_fn = OutputLoss.transformers()  # the same loss, with its per-example structure
    options.setdefault("progress", True)
    warmup = (options.pop("head_warmup_steps", 0), options.pop("head_warmup_lr", 1e-2))

    def scores():
        return sam_curvature_scores(model, loss_fn, data, exclude=always_train, seed=seed,
                                    **options)

    return Mask.top_k(
        _after_head_warmup(model, always_train, data, loss_fn, seed, *warmup,
                           options.get("progress", True), scores),
        density, scope, always_train=always_train, targets=targets,
    )


def _optimizer_side(name: str, description: str, optimizer: str) -> None:
    info = MethodInfo(name, "optimizer", False, True, description, optimizer)

    def builder(*_: Any, **__: Any) -> Mask:
        raise InvalidArgumentError(
            f"method {name!r} draws a new random mask at every step, so it is an optimizer, not "
            f"one fixed mask: use {optimizer} (see its docstring)"
        )

    _REGISTRY[name] = (info, builder)


_optimizer_side(
    "child_tuning_f",
    "Child-Tuning-F: a fresh Bernoulli(p) gradient mask each step, scaled by 1/p",
    "sparsetune.ChildTuningF(torch.optim.AdamW(model.parameters(), lr=...), reserve_p=p)",
)
_optimizer_side(
    "mixout",
    "Mixout: each step every entry is mixed back to theta0 with probability p, the rest "
    "rescaled by 1/(1-p)",
    "sparsetune.optim.Mixout(torch.optim.AdamW(model.parameters(), lr=...), mix_p=p)",
)


def register_method(
    name: str, info: MethodInfo, builder: _Builder, options: Iterable[str] = ()
) -> None:
    """Add a selection method (integrations use this, e.g. peft's ``lora`` and ``adapter``).

    ``builder(model, density, scope, always_train, *, data, loss_fn, seed, **options) -> Mask``.
    """
    if name in _REGISTRY:
        raise InvalidArgumentError(f"method {name!r} is already registered")
    _REGISTRY[name] = (info, builder)
    _OPTIONS[name] = set(options)


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

#: Methods that score every entry and keep the top k (they take ``targets``).
_TOP_K_METHODS = frozenset(
    {"random", "magnitude", "child_pruning", "lt_sft", "diff_pruning", "sam", "sam_curvature"}
)

_OPTIONS = {
    "random": set(),
    "bitfit": set(),
    "names": {"include", "exclude"},
    "magnitude": {"burn_in_steps", "lr", "progress"},
    "child_pruning": {"num_batches", "max_grad_norm", "progress"},
    "lt_sft": {"steps", "lr", "progress"},
    "diff_pruning": {"steps", "lr", "l0_weight", "init_log_alpha", "progress"},
    "sam": {"num_batches", "max_grad_norm", "progress", "head_warmup_steps", "head_warmup_lr"},
    "sam_curvature": {"num_batches", "max_grad_norm", "curvature_method", "num_samples",
                      "curvature_data", "curvature", "floor", "floor_fraction", "progress",
                      "head_warmup_steps", "head_warmup_lr"},
    "child_tuning_f": set(),
    "mixout": set(),
}


def method_options(method: str) -> frozenset[str]:
    """The option names ``select(model, method, ...)`` accepts for ``method``."""
    method_info(method)
    return frozenset(_OPTIONS.get(method, ()))


def method_info(method: str) -> MethodInfo:
    """Family, needs and description of ``method``."""
    if method not in _REGISTRY:
        raise InvalidArgumentError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    return _REGISTRY[method][0]


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
        options: method options (``num_batches``, ``max_grad_norm``, ``steps``, ``lr``,
            ``burn_in_steps``, ``include``, ``exclude``, ``progress``; for ``sam_curvature``
            also ``curvature_method``, ``num_samples``, ``curvature_data``, ``curvature``,
            ``floor``, ``floor_fraction``: see :func:`sparsetune.select.sam_curvature_scores`;
            for ``sam`` and ``sam_curvature`` also ``head_warmup_steps`` (default 0) and
            ``head_warmup_lr`` (default 1e-2): first train the ``always_train`` parameters
            (the task head) alone for that many AdamW steps on ``data`` (a linear probe), then
            score; the model is left as found).
    """
    info = method_info(method)
    if info.family == "optimizer":
        _REGISTRY[method][1]()
    always = [always_train] if isinstance(always_train, str) else list(always_train)
    names = {n for n, _ in trainable(model)}
    unknown = sorted(set(always) - names)
    if unknown:
        raise ParameterMismatchError(
            f"always_train names parameters the model lacks (or that do not require grad): "
            f"{unknown}"
        )
    if info.uses_density and density is None:
        raise InvalidArgumentError(f"method {method!r} needs a density in (0, 1]")
    if not info.uses_density and density is not None:
        raise InvalidArgumentError(
            f"method {method!r} selects by rule and takes no density (got density={density!r})"
        )
    extra = sorted(set(options) - _OPTIONS[method])
    if extra:
        raise InvalidArgumentError(
            f"method {method!r} does not take options {extra}; it takes "
            f"{sorted(_OPTIONS[method]) or 'none'}"
        )
    if info.needs_data or options.get("burn_in_steps"):
        if data is None:
            raise InvalidArgumentError(f"method {method!r} needs data= (an iterable of batches)")
        loss_fn = loss_fn or transformers_loss
    if targets is not None:
        if method not in _TOP_K_METHODS:
            raise InvalidArgumentError(
                f"method {method!r} does not take targets; methods that do: "
                f"{sorted(_TOP_K_METHODS)}"
            )
        options["targets"] = target_names(model, targets, exclude=always)
    builder = _REGISTRY[method][1]
    return builder(
        model, density, scope, always, data=data, loss_fn=loss_fn, seed=seed, **options
    )


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
