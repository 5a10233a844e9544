"""SparseAdamW: AdamW whose moments exist only for the selected entries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_non_negative
from ..errors import InvalidArgumentError
from ..mask import Mask
from .compact import CompactStateOptimizer

__all__ = ["SparseAdamW"]


class SparseAdamW(CompactStateOptimizer):
    r"""AdamW (Loshchilov & Hutter) on the entries selected by a mask, state for those only.

    For the selected entries of each parameter, with gradient g at step t::

        theta <- theta - lr * wd * (theta - target)     # decoupled weight decay
        m     <- beta1 m + (1 - beta1) g
        v     <- beta2 v + (1 - beta2) g^2               (v_max <- max(v_max, v) with amsgrad)
        theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    with ``target = 0`` (``decay_to="zero"``, exactly ``torch.optim.AdamW``) or ``target =
    theta0`` (``decay_to="init"``: the L2-SP pull toward the pretrained values, the relaxed form
    of sparsity as regularisation, theory/ E2). Frozen entries are never read or written.

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``, ``theta0``) as 1-D
    tensors of the selected count, plus the selection's int32 flat index: about 12 bytes per
    selected fp32 entry against 8 bytes per entry of every parameter for dense AdamW. bf16/fp16
    parameters also get ``master``, the fp32 values of their selected entries, and fp32
    moments (16 bytes per selected entry in all); the step runs in fp32 on the masters, with
    the gradients cast to fp32, and writes them to the parameter rounded to nearest.

    Args:
        model_or_named_params: an ``nn.Module`` (its parameters that require grad),
            ``model.named_parameters()``, or groups whose ``"params"`` are ``(name, param)``.
        mask: the selected entries; must cover every trainable parameter given.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        decay_to: ``"zero"`` or ``"init"`` (see above).
        impl: how the step runs: ``"flat"`` (one buffer per state key for a whole param
            group, one update), ``"packed"`` (opt-in: also the parameters and gradients in one
            buffer each, O(1) launches in the number of tensors; see
            :mod:`sparsetune.optim.flat` for its memory costs), ``"foreach"`` (torch's
            multi-tensor ops per parameter) or ``"forloop"`` (one parameter at a time, the
            reference); None (default): ``"flat"``. All give the same results.
        foreach: ``False`` means ``impl="forloop"``; ``True`` the automatic choice.
        master_weights: None or True (default): fp32 masters and state for bf16/fp16
            parameters (fp32/fp64 ones are their own masters: True is a no-op for them);
            False: update low-precision parameters in their own dtype, with state in it too
            (updates below half an ulp are lost).
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

    impls = ("flat", "packed", "foreach", "forloop")

    def __init__(
        self,
        model_or_named_params: Any,
        mask: Mask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        decay_to: str = "zero",
        impl: str | None = None,
        foreach: bool | None = None,
        master_weights: bool | None = None,
        fp32_grad_accumulation: bool | None = None,
        freeze_unselected: bool | None = None,
    ) -> None:
        check_non_negative("learning rate", lr)
        check_non_negative("epsilon value", eps)
        check_non_negative("weight_decay value", weight_decay)
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise InvalidArgumentError(
                    f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))"
                )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decay_to=decay_to,
            impl=impl,
            foreach=foreach,
            master_weights=master_weights,
            fp32_grad_accumulation=fp32_grad_accumulation,
        )
        super().__init__(model_or_named_params, mask, defaults, freeze_unselected)

    def _flat_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            keys.append("max_exp_avg_sq")
        if group["decay_to"] == "init":
            keys.append("theta0")
        return keys

    def _init_state(
        self, group: dict[str, Any], state: dict[str, Any], count: int, param: Tensor
    ) -> None:
        state["step"] = 0
        state["exp_avg"] = self._zeros(group, count, param)
        state["exp_avg_sq"] = self._zeros(group, count, param)
        if group["amsgrad"]:  # per group, as torch.optim.AdamW
            state["max_exp_avg_sq"] = self._zeros(group, count, param)

    def _update_single(
        self, group: dict[str, Any], value: Tensor, grad: Tensor, state: dict[str, Any]
    ) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if wd != 0:
            if group["decay_to"] == "zero":
                value.mul_(1 - lr * wd)
            else:
                value.add_(value - state["theta0"], alpha=-lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        second = exp_avg_sq
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        value.addcdiv_(exp_avg, denom, value=-step_size)

    def _update_foreach(
        self,
        group: dict[str, Any],
        values: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if wd != 0:
            if group["decay_to"] == "zero":
                torch._foreach_mul_(values, 1 - lr * wd)
            else:
                pulls = torch._foreach_sub(values, [s["theta0"] for s in states])
                torch._foreach_add_(values, pulls, alpha=-lr * wd)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        steps = [s["step"] for s in states]
        step_sizes = [-lr / (1 - beta1**t) for t in steps]
        bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
        second = exp_avg_sqs
        if group["amsgrad"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(values, exp_avgs, denom, step_sizes)
