"""The autograd functions of sparse-gradient mode, and the forward that routes a module to them.

Covered modules: ``nn.Linear`` (y = x W^T + b), ``nn.Embedding`` without ``max_norm``, and
transformers' ``Conv1D`` (GPT-2's projections: W of shape (in, out), y = x W + b, whose weight
gradient x^T g is the Linear product with the roles of g and x swapped).

Each returns the weight gradient as a sparse COO tensor holding only the plan's k entries
(:meth:`Plan.gradient <sparsetune.sparse_grad.plan.Plan.gradient>`, computed with float32
accumulation for 16-bit weights); input gradients stay dense.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .plan import Plan

__all__ = ["CompactForward", "SampledConv1D", "SampledEmbedding", "SampledLinear", "is_covered"]


class SampledLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dense dL/dx and b's gradient, W's only at the plan's entries."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
            grad_w = ctx.plan.gradient(ctx.plan.linear_values(g, x2), weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class SampledConv1D(torch.autograd.Function):
    """y = x W + b with W: (in, out) (transformers' Conv1D); backward: dense dL/dx and b's
    gradient, W's only at the plan's entries: (x^T g)[i, o], the plan laid over (in, out)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
        return out.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype).t()).to(x.dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
            grad_w = ctx.plan.gradient(ctx.plan.linear_values(x2, g), weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class SampledEmbedding(torch.autograd.Function):
    """An embedding lookup whose backward gives the weight gradient at the plan's entries."""

    @staticmethod
    def forward(
        ctx: Any, ids: Tensor, weight: Tensor, plan: Plan, padding_idx: int | None,
        scale_grad_by_freq: bool,
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.plan, ctx.padding_idx, ctx.scale = plan, padding_idx, scale_grad_by_freq
        ctx.weight_dtype = weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        values = ctx.plan.embedding_values(ids.reshape(-1), g, ctx.padding_idx, ctx.scale)
        return None, ctx.plan.gradient(values, ctx.weight_dtype), None, None, None


class CompactForward:
    """Replaces ``module.forward`` (as an instance attribute) while the mode is on."""

    def __init__(self, module: nn.Module, plan: Plan) -> None:
        self.module, self.plan = module, plan

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        tracked = torch.is_grad_enabled() and m.weight.requires_grad
        if isinstance(m, nn.Linear):
            if not tracked:
                return F.linear(x, m.weight, m.bias)
            self.plan.check_device(m.weight)
            return SampledLinear.apply(x, m.weight, m.bias, self.plan)
        if not isinstance(m, nn.Embedding):  # Conv1D (is_covered)
            if not tracked:
                return type(m).forward(m, x)
            self.plan.check_device(m.weight)
            return SampledConv1D.apply(x, m.weight, m.bias, self.plan)
        if not tracked:
            return F.embedding(x, m.weight, m.padding_idx, None, m.norm_type,
                               m.scale_grad_by_freq, m.sparse)
        self.plan.check_device(m.weight)
        return SampledEmbedding.apply(x, m.weight, self.plan, m.padding_idx,
                                      m.scale_grad_by_freq)


def is_covered(module: nn.Module) -> bool:
    """A stock Linear, Embedding or transformers Conv1D whose forward nobody has replaced."""
    if "forward" in module.__dict__:
        return False
    if type(module).forward is nn.Linear.forward or _is_conv1d(module):
        return True
    return type(module).forward is nn.Embedding.forward and module.max_norm is None


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D with its stock forward (looked up only if transformers is loaded)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and type(module).forward is conv1d.forward
