"""Merging a delta into a quantized base weight: dequantize, add, quantize again, report.

``DeltaHandle.merge(requantize=True)`` cannot fold theta0 + v into a quantized weight exactly
(its stored integers cannot hold the new values), so per layer it builds the exact merged weight
E = dequant(W) with :func:`~sparsetune.modules.merged_weight_values` written at the selected
entries (in the weight's high-precision dtype), quantizes E with the weight's own torchao scheme
(``Int8Tensor.from_hp``: same block size, symmetric int8, same activation settings) and reports
the error this introduced against E (:class:`RequantizeReport`).

Scales: re-choosing every block's scale from E would move *every* entry of the layer (the
max-abs rule of a dequantized block gives a scale 127/127.5 of the old one, and each integer
re-rounds). So a block keeps its scale when every value of E in it still lies within the block's
range (|E / s| rounds into [qmin, qmax]); then its unselected entries come back bit for bit and
only the selected entries round, by at most s/2. A block whose range the delta left gets the
scale torchao chooses for E (``from_hp`` without a scale), and all its entries re-round.

Supported: torchao ``Int8Tensor`` 2-D weights with a symmetric (zero) zero point and no
activation pre-scale (``Int8WeightOnlyConfig`` and ``Int8DynamicActivationInt8WeightConfig``,
any granularity). Anything else is refused before any layer changes. torchao is imported only
when a quantized weight is met (it is already imported then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from .slot import merged_weight_values

__all__ = ["RequantizeReport", "check_requantizable", "requantized_merge"]


@dataclass(frozen=True)
class RequantizeReport:
    """The error one requantized merge introduced in one layer's weight, against the exact
    merged weight E (dequantized base with theta0 + v at the selected entries; float64 norms).

    ``max_abs_error``: max |R - E| over the layer (R: the requantized weight, dequantized);
    ``relative_error``: ||R - E||_F / ||E||_F; ``selected_max_abs_error`` and
    ``selected_relative_error``: the same over the delta's selected entries only;
    ``rescaled_blocks`` of ``blocks``: quantization blocks whose scale had to change because
    the merged values left their range (only those blocks' unselected entries moved).
    """

    layer: str
    max_abs_error: float
    relative_error: float
    selected_max_abs_error: float
    selected_relative_error: float
    rescaled_blocks: int
    blocks: int


def _int8_class(weight: Tensor) -> type | None:
    if not type(weight).__module__.startswith("torchao"):
        return None
    from torchao.quantization import Int8Tensor

    return Int8Tensor if isinstance(weight, Int8Tensor) else None


def check_requantizable(layer: str, weight: Tensor) -> None:
    """Raise :class:`InvalidArgumentError` naming ``layer`` unless :func:`requantized_merge`
    supports its weight (module docstring)."""
    kind = f"{type(weight).__module__}.{type(weight).__name__}"
    if _int8_class(weight) is None:
        raise InvalidArgumentError(
            f"merge(requantize=True) supports torchao Int8Tensor weights (Int8WeightOnlyConfig); "
            f"layer {layer!r} has a {kind}: keep the delta attached")
    zero = weight.zero_point
    why = ("it is not 2-D" if weight.ndim != 2 else
           "its zero point is not 0 (asymmetric)" if zero is not None and bool(zero.any()) else
           "it has an activation pre-scale" if weight.act_pre_scale is not None else None)
    if why is not None:
        raise InvalidArgumentError(
            f"merge(requantize=True) cannot requantize the weight of layer {layer!r}: {why}")


def _blocks(t: Tensor, block_size: list[int]) -> Tensor:
    """(N, K) -> (N / b0, b0, K / b1, b1): the quantization blocks of a weight."""
    (n, k), (b0, b1) = t.shape, block_size
    return t.reshape(n // b0, b0, k // b1, b1)


def _errors(diff: Tensor, exact: Tensor) -> tuple[float, float]:
    """(max |diff|, ||diff|| / ||exact||) in float64; 0/0 counts as 0."""
    if diff.numel() == 0:
        return 0.0, 0.0
    top, norm, ref = float(diff.abs().max()), float(diff.norm()), float(exact.norm())
    return top, (norm / ref if ref else (0.0 if norm == 0 else float("inf")))


@torch.no_grad()
def requantized_merge(
    layer: str, weight: Tensor, indices: Tensor, values: Tensor
) -> tuple[nn.Parameter, RequantizeReport]:
    """The quantized weight holding theta0 + v at ``indices`` ((2, k) row, column pairs) and
    its :class:`RequantizeReport`; ``weight`` itself is not changed. Call
    :func:`check_requantizable` first."""
    from torchao.quantization.granularity import PerBlock

    cls = _int8_class(weight)
    block_size = list(weight.block_size)
    exact = weight.dequantize()
    where = (indices[0], indices[1])
    exact[where] = merged_weight_values(exact[where], values.detach().to(exact.device))
    qmin, qmax = (-64, 63) if weight.reduce_range else (-128, 127)
    old = weight.scale
    ratio = _blocks(exact.float(), block_size) / old[:, None, :, None]
    left = ((ratio > qmax + 0.5) | (ratio < qmin - 0.5)).any(3).any(1)
    scale = old
    granularity = PerBlock(tuple(block_size))
    if bool(left.any()):
        fresh = cls.from_hp(exact, granularity, reduce_range=weight.reduce_range).scale
        scale = torch.where(left, fresh.to(old.dtype), old)
    new = cls.from_hp(
        exact, granularity, scale=scale.clone(), act_quant_kwargs=weight.act_quant_kwargs,
        act_quant_scale=weight.act_quant_scale, act_quant_zero_point=weight.act_quant_zero_point,
        reduce_range=weight.reduce_range)
    exact64, diff = exact.double(), new.dequantize().double() - exact.double()
    top, rel = _errors(diff, exact64)
    sel_top, sel_rel = _errors(diff[where], exact64[where])
    report = RequantizeReport(layer, top, rel, sel_top, sel_rel, int(left.sum()), left.numel())
    return nn.Parameter(new, requires_grad=False), report
