"""SparseSGD: SGD with momentum whose buffers exist only for the selected entries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_non_negative
from ..errors import InvalidArgumentError
from ..mask import Mask
from .compact import CompactStateOptimizer

__all__ = ["SparseSGD"]


class SparseSGD(CompactStateOptimizer):
    r"""SGD on the entries selected by a mask, momentum buffer for those only.

    For the selected entries, with gradient g (``torch.optim.SGD``'s rule)::

        g   <- g + wd * (theta - target)          # coupled weight decay (L2)
        b   <- g at the first step, else mu b + (1 - dampening) g
        g   <- g + mu b  (nesterov)  or  b
        theta <- theta - lr g

    with ``target = 0`` (``decay_to="zero"``) or ``theta0`` (``decay_to="init"``, the L2-SP
    regulariser, theory/ E2). Frozen entries are never read or written. bf16/fp16 parameters
    get fp32 master values of their selected entries and an fp32 momentum buffer (12 bytes per
    selected entry with momentum, index included); the step runs in fp32 and writes the
    masters to the parameter rounded to nearest.

    Args:
        model_or_named_params: an ``nn.Module``, ``named_parameters()`` or named groups.
        mask: the selected entries; must cover every trainable parameter given.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        decay_to: ``"zero"`` or ``"init"``.
        impl: how the step runs: ``"foreach"`` (torch's multi-tensor ops per parameter; the
            default for None), ``"flat"`` (one buffer per state key for a whole param group,
            one update), ``"packed"`` (opt-in: also the parameters and gradients in one buffer
            each, O(1) launches in the number of tensors; memory costs in
            :mod:`sparsetune.optim.flat`) or ``"forloop"`` (one parameter at a time, the
            reference); all give the same results. ``"flat"`` and ``"packed"`` run from the
            second step (the momentum buffers are created by the first).
        foreach: ``False`` means ``impl="forloop"``; ``True`` the automatic choice.
        master_weights: None or True (default): fp32 masters and state for bf16/fp16
            parameters (a no-op for fp32/fp64 ones); False: update them in their own dtype.
        fp32_grad_accumulation: None or True (default): for bf16/fp16 parameters with
            masters, dense gradients of several backward passes are also summed in fp32 at the
            selected entries (4 bytes per selected entry; see
            :mod:`sparsetune.optim.grad_accumulation`);
            False: the step reads ``.grad`` as autograd summed it, in the parameter's dtype.
        freeze_unselected: True: parameters the mask selects no entry of stop requiring
            grad, so the backward builds no gradient for them (names in
            ``frozen_parameters``); False: left as given; None (default): True except under
            DDP (a process group and unsharded parameters; see
            :mod:`sparsetune.optim.freezing`).
    """

    impls = ("foreach", "flat", "packed", "forloop")

    def __init__(
        self,
        model_or_named_params: Any,
        mask: Mask,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        maximize: bool = False,
        decay_to: str = "zero",
        impl: str | None = None,
        foreach: bool | None = None,
        master_weights: bool | None = None,
        fp32_grad_accumulation: bool | None = None,
        freeze_unselected: bool | None = None,
    ) -> None:
        check_non_negative("learning rate", lr)
        check_non_negative("momentum value", momentum)
        check_non_negative("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InvalidArgumentError(
                f"Nesterov momentum requires a momentum > 0 and zero dampening, got "
                f"momentum={momentum!r}, dampening={dampening!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            decay_to=decay_to,
            impl=impl,
            foreach=foreach,
            master_weights=master_weights,
            fp32_grad_accumulation=fp32_grad_accumulation,
        )
        super().__init__(model_or_named_params, mask, defaults, freeze_unselected)

    def _flat_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["momentum_buffer"] if group["momentum"] != 0 else []
        if group["decay_to"] == "init":
            keys.append("theta0")
        return keys

    def _init_state(
        self, group: dict[str, Any], state: dict[str, Any], count: int, param: Tensor
    ) -> None:
        state["step"] = 0
        state["momentum_buffer"] = None  # created from the first gradient, as torch.optim.SGD

    def _decayed(self, group: dict[str, Any], value: Tensor, grad: Tensor, state: dict) -> Tensor:
        wd = group["weight_decay"]
        if wd == 0:
            return grad
        if group["decay_to"] == "zero":
            return grad.add(value, alpha=wd)
        return grad.add(value - state["theta0"], alpha=wd)

    def _update_single(
        self, group: dict[str, Any], value: Tensor, grad: Tensor, state: dict[str, Any]
    ) -> None:
        grad = self._decayed(group, value, grad, state)
        momentum = group["momentum"]
        if momentum != 0:
            buf = state["momentum_buffer"]
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        value.add_(grad, alpha=-group["lr"])

    def _update_foreach(
        self,
        group: dict[str, Any],
        values: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            if group["decay_to"] == "zero":
                grads = torch._foreach_add(grads, values, alpha=wd)
            else:
                pulls = torch._foreach_sub(values, [s["theta0"] for s in states])
                grads = torch._foreach_add(grads, pulls, alpha=wd)
        if momentum != 0:
            old = [i for i, s in enumerate(states) if s["momentum_buffer"] is not None]
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - group["dampening"])
            for i, s in enumerate(states):
                if s["momentum_buffer"] is None:
                    s["momentum_buffer"] = grads[i].detach().clone()
            bufs = [s["momentum_buffer"] for s in states]
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(values, grads, alpha=-group["lr"])
