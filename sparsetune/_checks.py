"""Validators for scalar arguments: each returns the value or raises one clear error.

Every message names the argument, echoes the value received and says what is allowed
(``"steps must be an integer >= 1, got steps=0"``). :func:`unwrap_compiled` gives the plain
module behind ``torch.compile(model)``, so that every name sparsetune stores is the plain model's.
Imports nothing of sparsetune but ``errors``.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any

import torch

from .errors import InvalidArgumentError

__all__ = [
    "check_density",
    "check_flag",
    "check_int",
    "check_non_negative",
    "check_positive",
    "logical_shape",
    "reject_sharded",
    "unwrap_compiled",
]


def check_density(density: Any, name: str = "density") -> float:
    """Return ``density`` as a float, or raise if it is not a real number in (0, 1].

    Strings, ``bool`` (``True`` would be a full mask), None and NaN are refused: a density is
    never converted from another type.
    """
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a real number in (0, 1], got {name}={density!r} "
            f"({type(density).__name__})"
        )
    value = float(density)
    if not (0.0 < value <= 1.0):  # NaN fails every comparison
        raise InvalidArgumentError(f"{name} must be in (0, 1], got {name}={density!r}")
    return value


def logical_shape(param: Any) -> torch.Size:
    """The shape of the values a parameter stands for: its own shape, except a bitsandbytes
    4-bit weight (``Params4bit``), whose packed storage is (numel / 2, 1) and whose
    ``quant_state.shape`` is the (out, in) of the float weight it holds."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def unwrap_compiled(model: Any) -> Any:
    """The module that ``torch.compile(model)`` wraps, or ``model`` itself if not compiled.

    A compiled model (``torch._dynamo.eval_frame.OptimizedModule``) shares its parameters with
    the original but names them ``_orig_mod.NAME``; sparsetune keys masks, scores and deltas by
    the plain names, so each entry point unwraps. Importing dynamo takes seconds, so it is not
    imported here: a compiled model exists only once something else has imported it.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return model
    while isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def check_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> Any:
    """Return ``value`` if it is an int >= ``minimum`` (or None with ``allow_none``), else raise.

    ``bool`` is refused although it is an ``int`` subclass: ``steps=True`` is a mistake.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise InvalidArgumentError(f"{name} must be {allowed}, got {name}={value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise naming the argument."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number > 0 (NaN refused), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgumentError(f"{name} must be a number > 0, got {name}={value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number >= 0 (NaN refused), else raise.

    The message follows torch.optim's ("Invalid lr: -1 ..."), as optimizer arguments use it.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgumentError(f"Invalid {name}: {value!r} (must be a number >= 0)")
    return float(value)


def reject_sharded(model: Any, who: str, advice: str) -> None:
    """Raise :class:`InvalidArgumentError` if any parameter of ``model`` is a DTensor (FSDP2
    ``fully_shard``, tensor parallelism): ``who`` does not take sharded models; ``advice`` says
    what to do instead."""
    if "torch.distributed.tensor" not in sys.modules or not hasattr(model, "named_parameters"):
        return  # no DTensor was ever made; or not a model, which the caller's checks report
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise InvalidArgumentError(
            f"{who} does not support sharded parameters (FSDP2 fully_shard, tensor "
            f"parallelism) yet: {len(sharded)} parameters are DTensors, e.g. {sharded[:3]}; "
            f"{advice}"
        )

