"""One interface over every selection method: ``select(model, method, density, ...)``.

Each name maps to a method's config class (:mod:`sparsetune.select.methods`): its options,
checked before any work, its flags (density, data, burn-in training, all-reducible statistic)
and how it builds the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import nn

from .._checks import check_density, check_int, unwrap_compiled
from .._loss import LossFn, transformers_loss
from .._topk import SCOPES, check_budget
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ._data import trainable
from ._targets import target_names
from .methods import BUILTIN, MethodConfig, MethodInfo, builder_config

__all__ = [
    "METHODS", "CheckedSelection", "MethodInfo", "check_select", "method_info", "method_options",
    "method_spec", "register_method", "select", "target_names",
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
        model: the pretrained model; its weights and modes are left exactly as found. A
            ``torch.compile``'d model is read through the module it wraps, so the mask has
            the plain model's names (no ``_orig_mod.``).
        method: a name from ``METHODS``.
        density: p in (0, 1], a real number, for methods that take a budget; one that buys no
            entry (floor(m p) = 0) is an error naming the smallest density that buys one.
            Rule methods such as ``bitfit`` and ``names`` give their own density: passing one
            to them is an error rather than silently ignored.
        data, loss_fn: batches and ``loss_fn(model, batch) -> scalar`` for data-driven methods;
            ``loss_fn`` defaults to ``model(**batch).loss``; for a causal LM (``*ForCausalLM``,
            ``GPT2LMHeadModel``) batches of ``input_ids`` (and ``attention_mask``) need no
            labels: next-token prediction on the unpadded tokens (``transformers_loss``).
        scope: ``"global"`` (the paper's theorem) or ``"per_tensor"`` (the authors' code).
        seed: seed of random choices (random masks, dropout in burn-in steps).
        always_train: parameter names trained in full and left out of the budget.
        targets: the parameters allowed to receive entries, in peft's ``target_modules``
            vocabulary or as regexes (:func:`target_names`): ``"all-linear"`` (the weight of
            every Linear/Conv1D but the output head), plain identifiers as module-name
            suffixes (``["q_proj", "v_proj"]``: those modules' weights, as LoRA adapts), any
            other string as a regex over parameter names (``re.search``), e.g.
            ``r"attention\.self\.(query|value)\.weight$"``. The budget is still p of the whole
            model (``mask.density == p``). Methods that score entries only (not rules).
        options: method options, the fields of the method's config class
            (:func:`method_spec`), all checked before any work (``num_batches``,
            ``max_grad_norm``, ``steps``, ``lr``, ``burn_in_steps``, ``include``, ``exclude``,
            ``l0_weight``, ``init_log_alpha``, ``progress``; for ``lt_sft`` and ``magnitude``
            with a burn-in also ``offload`` (None, ``"cpu"``, ``"disk"``: where the burn-in
            keeps theta0 and AdamW's moments, same mask); for ``sam_curvature``
            also ``curvature_method``, ``num_samples``, ``curvature_data``, ``curvature``,
            ``floor``, ``floor_fraction``: see :func:`sparsetune.select.sam_curvature_scores`;
            for ``sam`` and ``sam_curvature`` also ``head_warmup_steps`` (default 0) and
            ``head_warmup_lr`` (default 1e-2): first train the ``always_train`` parameters
            (the task head) alone for that many AdamW steps on ``data`` (a linear probe), then
            score; the model is left as found).
            ``num_batches`` larger than the data's length reads every batch, with a warning.
            ``progress`` (every built-in method, default True): tqdm bars on stderr, one per
            phase, cleared when done: the batches read (gradients, burn-in steps), the
            tensors scored (or sampled, matched) and the tensors merged, with tensors/s; the
            mask is the same either way.

    Every argument but the data is checked (:func:`check_select`) before any batch is read
    or any gradient computed.
    """
    checked = check_select(model, method, density, scope=scope, seed=seed,
                           always_train=always_train, targets=targets, options=options)
    config = checked.config
    if config.needs_data:
        if data is None:
            raise InvalidArgumentError(f"method {method!r} needs data= (an iterable of batches)")
        if not isinstance(data, Iterable):
            raise InvalidArgumentError(
                f"data must be an iterable of batches (a list or a DataLoader), got "
                f"{type(data).__name__}"
            )
        loss_fn = loss_fn or transformers_loss
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(
            f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
        )
    return config.build(checked.model, density, scope, checked.always, data=data,
                        loss_fn=loss_fn, seed=seed, targets=checked.targets)


class CheckedSelection(NamedTuple):
    """The arguments of a selection, checked: see :func:`check_select`."""

    model: nn.Module  # the plain model (a torch.compile wrapper removed)
    config: MethodConfig
    always: list[str]
    targets: list[str] | None  # the parameter names targets covers


def check_select(
    model: nn.Module,
    method: str,
    density: float | None = None,
    *,
    scope: str = "global",
    seed: int = 0,
    always_train: str | Iterable[str] = (),
    targets: str | Iterable[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> CheckedSelection:
    """Check every argument of :func:`select` but the data, before any gradient pass or read.

    The method and its options (its config class), ``scope``, ``seed``, the ``always_train``
    names and ``targets`` patterns against ``model``, and ``density``: a real number in
    (0, 1] whose budget over the model's trainable parameters is at least one entry (and fits
    the targets). A ``torch.compile``'d model is checked, and returned, as its plain module.
    """
    model = unwrap_compiled(model)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    spec = method_spec(method)
    spec.refuse_if_per_step()
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got scope={scope!r}")
    check_int("seed", seed, minimum=-(2**63))
    always = [always_train] if isinstance(always_train, str) else list(always_train)
    sizes = {n: p.numel() for n, p in trainable(model)}
    unknown = sorted(set(always) - set(sizes))
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
    if spec.uses_density:
        check_density(density)
    config = spec.from_options(dict(options or {}))
    chosen = None
    if targets is not None:
        if not spec.takes_targets:
            takes = sorted(n for n, c in _REGISTRY.items() if c.takes_targets)
            raise InvalidArgumentError(
                f"method {method!r} does not take targets; methods that do: {takes}"
            )
        chosen = target_names(model, targets, exclude=always)
    if spec.takes_targets:  # top-k of scores over every trainable parameter
        check_budget(sizes, density, scope, always_train=always, targets=chosen)
    return CheckedSelection(model, config, always, chosen)
