"""DiffPruning's gate logits on FSDP2 shards: :func:`diff_pruning_scores` for a sharded model.

One process (:func:`sparsetune.select.methods.projection.diff_pruning_scores`) trains, for
every trainable parameter, a diff ``w`` (from 0) and gate logits ``a`` (from
``init_log_alpha``) with one Adam, for ``steps`` batches: theta = theta0 + z(a, u) * w with
hard-concrete gates z = clamp(sigmoid((log u - log(1 - u) + a) / beta) * (zeta - gamma) +
gamma, 0, 1), u uniform, drawn tensor by tensor from one generator seeded by ``seed``; the loss
is loss(theta) + l0_weight * sum sigmoid(a - beta log(-gamma / zeta)); the scores are the final
``a``.

:func:`sharded_diff_pruning_scores` does the same on each rank's shards, gathering no
parameter:

* each rank keeps ``w`` and ``a`` of its own shards (the rows ``[start, end)`` of each
  parameter) and one Adam over them, in one process's order (Adam updates each entry from its
  own gradient and state alone: the one-process update of those entries);
* every rank draws the *full* u of each parameter from its generator, in one process's order
  (so the draws are one process's, one parameter at a time: the peak adds the largest
  parameter), and keeps its shard's rows;
* it writes theta0 + z * w into its shards (no gradient) and runs the model's forward and
  backward on its part of the global batch: FSDP2's reduce-scatter leaves on each rank its
  shard of the gradient of the mean of the ranks' mean losses, with equal parts the gradient of
  one process's mean loss on the global batch (up to the order of the floating-point sums);
* the chain rule is local: that gradient is backpropagated through theta_local = theta0_local
  + z(a_local) * w_local (``torch.autograd.backward``), together with the L0 term of the local
  ``a`` (the penalty is a sum over all entries, so its gradient is elementwise and needs no
  communication), and Adam steps. A parameter the loss does not reach gets no gradient: its
  ``w`` takes no step, its ``a`` only the L0 term's, as in one process.

On exit the shards are written back from theta0 (a clone of each rank's shards, which the diffs
need anyway), and every ``.grad``, buffer, ``requires_grad`` flag and module mode is put back
bit for bit (:func:`sparsetune._loss.restoring`). Dropout draws come from a generator seeded by
``seed`` on every rank, but each rank draws them for its own rows, as in the sharded burn-in
(:mod:`.fsdp_burn_in`): with dropout, the scores are not one process's, only like them.
Memory per rank: theta0, ``w``, ``a`` and Adam's two moments of the local shards (5x the
shards), the largest full parameter's u and what one forward and backward hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._loss import LossFn, restoring
from ..optim.sharded import local, shard_rows
from ..select.methods.projection import (
    HARD_CONCRETE_BETA,
    HARD_CONCRETE_GAMMA,
    HARD_CONCRETE_ZETA,
    hard_concrete_gates,
)
from .fsdp_burn_in import _lockstep

__all__ = ["sharded_diff_pruning_scores"]


def sharded_diff_pruning_scores(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float,
    l0_weight: float,
    init_log_alpha: float,
    seed: int,
    device: torch.device,
    group: Any,
) -> dict[str, Tensor]:
    """This rank's shard of each of ``params``' (name -> sharded trainable parameter, in the
    model's order) DiffPruning scores, the final gate logits (module docstring); ``model`` is
    left as found, bit for bit. The options are already checked. Collective over ``group``."""
    shards = {n: local(p.detach()) for n, p in params.items()}  # sharing the storage
    rows = {n: shard_rows(p) for n, p in params.items()}
    base = {n: s.clone() for n, s in shards.items()}  # theta0: restores the shards at the end
    diffs = {n: torch.zeros_like(s, requires_grad=True) for n, s in shards.items()}
    logits = {n: torch.full_like(s, init_log_alpha, requires_grad=True)
              for n, s in shards.items()}
    opt = torch.optim.Adam([*diffs.values(), *logits.values()], lr=lr)
    draws = next(iter(base.values())).device  # one process draws u on the parameters' device
    gen = torch.Generator(device=draws).manual_seed(seed)
    shift = HARD_CONCRETE_BETA * math.log(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)
    try:
        with restoring(model, parameters=False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            for batch in _lockstep(data, steps, device, group, "diff pruning"):
                theta = {}
                for n, a in logits.items():
                    u = torch.rand(params[n].shape, generator=gen, device=draws, dtype=a.dtype)
                    start, end = rows[n]
                    theta[n] = base[n] + hard_concrete_gates(a, u[start:end]) * diffs[n]
                with torch.no_grad():
                    for n, t in theta.items():
                        shards[n].copy_(t)
                for p in params.values():
                    p.grad = None
                loss_fn(model, batch).backward()  # each rank: its shard of d loss / d theta
                expected_l0 = sum(torch.sigmoid(a - shift).sum() for a in logits.values())
                outputs, grads = [l0_weight * expected_l0], [None]
                for n, p in params.items():
                    if p.grad is not None:  # a parameter the loss reaches
                        outputs.append(theta[n])
                        grads.append(local(p.grad))
                    p.grad = None
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(outputs, grads)
                opt.step()
                del theta, outputs, grads
    finally:
        opt.state.clear()
        with torch.no_grad():  # restoring() has put the gradients, flags and modes back
            for n, s in shards.items():
                s.copy_(base[n])
    return {n: a.detach() for n, a in logits.items()}
