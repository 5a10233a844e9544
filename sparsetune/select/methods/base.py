"""What every selection method is: a frozen config dataclass of its options, with its flags.

A method's config class holds its options as typed fields with defaults, checks every one of
them on construction (one :class:`InvalidArgumentError` naming the option and the value), and
builds the mask with :meth:`MethodConfig.build`. Class-level flags say what the method needs:
a density, data, training steps, which option counts the batches it reads, and whether it has
a statistic that data-parallel ranks can all-reduce. The registry maps names to these classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..._checks import check_flag
from ..._loss import LossFn
from ...errors import InvalidArgumentError
from ...mask import Mask

__all__ = ["MethodConfig", "MethodInfo", "builder_config", "check_flag"]


@dataclass(frozen=True)
class MethodInfo:
    """What a selection method is and what it needs."""

    name: str
    family: str  # "random", "rule", "projection", "sam" or "optimizer"
    needs_data: bool
    uses_density: bool
    description: str
    optimizer: str | None = None  # for per-step methods: the optimizer class that implements it


@dataclass(frozen=True)
class MethodConfig:
    """The options of one selection method (checked on construction) and how it selects.

    Subclasses are frozen dataclasses whose fields are the method's options; they set the
    class-level flags below and implement :meth:`build`.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # "random", "rule", "projection", "sam" or "optimizer"
    description: ClassVar[str]
    #: whether ``select`` takes a density (rule methods give their own)
    uses_density: ClassVar[bool] = True
    #: whether the method reads data at its default options (see :attr:`needs_data`)
    uses_data: ClassVar[bool] = False
    #: whether selection runs training steps (a fine-tuning burn-in) on the data
    trains_burn_in: ClassVar[bool] = False
    #: the option that counts the batches read (``"num_batches"`` or ``"steps"``), or None
    count_option: ClassVar[str | None] = None
    #: whether the method scores entries and keeps the top k (then it takes ``targets``)
    takes_targets: ClassVar[bool] = False
    #: per-step methods: the optimizer that implements them (no fixed mask)
    optimizer: ClassVar[str | None] = None
    #: whether :meth:`statistic` is a sum over batches that ranks can all-reduce
    all_reducible: ClassVar[bool] = False
    #: the options the all-reducible statistic takes (what ``select_distributed`` accepts)
    statistic_options: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self.refuse_if_per_step()
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the first bad option (none here)."""

    @classmethod
    def refuse_if_per_step(cls) -> None:
        """Raise for per-step methods: they are optimizers, not one fixed mask."""
        if cls.optimizer is not None:
            raise InvalidArgumentError(
                f"method {cls.name!r} draws a new random mask at every step, so it is an "
                f"optimizer, not one fixed mask: use {cls.optimizer} (see its docstring)"
            )

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The option names the method takes (its fields)."""
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MethodConfig:
        """The config for ``options``; unknown names and bad values raise before any work."""
        takes = cls.option_names()
        extra = sorted(set(options) - takes)
        if extra:
            raise InvalidArgumentError(
                f"method {cls.name!r} does not take options {extra}; it takes "
                f"{sorted(takes) or 'none'}"
            )
        return cls(**options)

    @classmethod
    def info(cls) -> MethodInfo:
        """Family, needs and description, as :func:`sparsetune.select.method_info` gives."""
        return MethodInfo(cls.name, cls.family, cls.uses_data, cls.uses_density,
                          cls.description, cls.optimizer)

    @property
    def needs_data(self) -> bool:
        """Whether these options read data (``magnitude`` does only with a burn-in)."""
        return self.uses_data

    def build(
        self,
        model: nn.Module,
        density: float | None,
        scope: str,
        always_train: list[str],
        *,
        data: Iterable[Any] | None,
        loss_fn: LossFn | None,
        seed: int,
        targets: list[str] | None,
    ) -> Mask:
        """The mask of ``model`` (left as found); arguments already checked by ``select``."""
        raise NotImplementedError

    def statistic(
        self, model: nn.Module, loss_fn: LossFn, data: Iterable[Any]
    ) -> dict[str, Tensor]:
        """The method's statistic: a sum over batches (only where :attr:`all_reducible`)."""
        raise InvalidArgumentError(f"method {self.name!r} has no statistic to all-reduce")

    def scores_from_statistic(self, total: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The scores from the statistic summed over every batch (of every rank)."""
        raise InvalidArgumentError(f"method {self.name!r} has no statistic to all-reduce")


_UNSET: Any = object()


def builder_config(
    info: MethodInfo, builder: Callable[..., Mask], options: Iterable[str] = ()
) -> type[MethodConfig]:
    """A config class for a method registered as ``info`` and a ``builder`` function.

    ``builder(model, density, scope, always_train, *, data, loss_fn, seed, **options) -> Mask``
    receives the options that were given (the others have no default here).
    """

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        given = {k: v for k, v in given.items() if v is not _UNSET}
        return builder(model, density, scope, always_train, data=data, loss_fn=loss_fn,
                       seed=seed, **given)

    namespace = {
        "name": info.name, "family": info.family, "description": info.description,
        "uses_density": info.uses_density, "uses_data": info.needs_data,
        "optimizer": info.optimizer, "build": build, "info": classmethod(lambda cls: info),
    }
    return make_dataclass(
        "RegisteredMethodConfig", [(o, Any, field(default=_UNSET)) for o in sorted(options)],
        bases=(MethodConfig,), namespace=namespace, frozen=True,
    )
