"""fp32 master values of the selected entries of low-precision (bf16, fp16) parameters.

A bf16 weight of magnitude 0.02 has an ulp of 1.2e-4: an update of lr = 1e-5 is below half of
it and is rounded away at every step. With master values the compact optimizers keep, for the
selected entries only, an fp32 copy of the values and fp32 state (moments, momentum,
``theta0``); each step updates the copy in fp32 from the fp32-cast gradients and writes it to
the parameter rounded to nearest.

Writes from outside (``p.data`` edits, ``load_state_dict``, :class:`sparsetune.SparseDelta`,
...) are seen: before each step, every selected entry whose current value differs from its
master rounded to the parameter's dtype (what the optimizer last wrote) takes the master from
the parameter again.

Gradients: the k selected gradient values are cast to fp32 at the step. A dense ``p.grad`` is
accumulated by autograd in the parameter's dtype, so gradient accumulation over micro-batches
of a bf16 model sums in bf16 (small contributions can be lost before the optimizer sees them);
the compact gradients of :func:`sparsetune.prepare` handle their own accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import InvalidArgumentError
from .selection import Selection

#: The parameter dtypes that get master values unless ``master_weights=False``.
LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_DTYPE = torch.float32


def check_master_weights(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(f"master_weights must be True, False or None, got {value!r}")


def uses_master(group: dict[str, Any], param: Tensor) -> bool:
    """True when ``param`` is bf16/fp16 and its group does not say ``master_weights=False``."""
    return param.dtype in LOW_PRECISION and group.get("master_weights") is not False


def state_dtype(group: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype of ``param``'s floating-point optimizer state: fp32 with masters, else its own."""
    return MASTER_DTYPE if uses_master(group, param) else param.dtype


def fit_state(group: dict[str, Any], state: dict[str, Any], param: Tensor, sel: Selection) -> bool:
    """Bring ``state`` in line with ``param``'s current dtype and device; True: masters in use.

    A parameter moved or cast since the last step (``model.to(...)``) gets its state cast as
    ``load_state_dict`` would; a low-precision one without a master (first step, or a state
    saved by an fp32 run) gets one from its current values; one that no longer needs a master
    drops it.
    """
    master = uses_master(group, param)
    dtype = MASTER_DTYPE if master else param.dtype
    if sel.index is not None and sel.index.device != param.device:
        sel.index = sel.index.to(param.device)
    for key, value in state.items():
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and (value.dtype != dtype or value.device != param.device)
        ):
            state[key] = value.to(device=param.device, dtype=dtype)
    if master and "master" not in state:
        state["master"] = sel.gather(param).to(MASTER_DTYPE, copy=True)
    elif not master:
        state.pop("master", None)
    return master


def resync_(master: Tensor, current: Tensor) -> Tensor:
    """Take ``master`` from ``current`` (the parameter's selected values) where they disagree.

    ``current`` differs from ``master`` rounded to its dtype only where someone else wrote the
    parameter since the optimizer's last step; elsewhere the master is kept, in full precision.
    """
    kept = current == master.to(current.dtype)
    return master.copy_(torch.where(kept, master, current.to(master.dtype)))


def remember_full_precision_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: keep the saved fp32 state of parameters with masters.

    torch casts every floating-point state tensor to its parameter's dtype on load, which
    would round fp32 moments and masters to bf16; the post-hook puts the saved values back.
    """
    pending: dict[Tensor, dict[str, Tensor]] = {}
    saved_state = state_dict.get("state", {})
    for saved, group in zip(state_dict.get("param_groups", []), optimizer.param_groups):
        for pid, param in zip(saved["params"], group["params"]):
            entry = saved_state.get(pid)
            if entry is None or not uses_master(saved, param):
                continue
            pending[param] = {
                key: value
                for key, value in entry.items()
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step"
            }
    optimizer._full_precision_pending = pending  # type: ignore[attr-defined]


def restore_full_precision_state(optimizer: Optimizer) -> None:
    """``load_state_dict`` post-hook: see :func:`remember_full_precision_state`."""
    pending = optimizer.__dict__.pop("_full_precision_pending", {})
    for param, entries in pending.items():
        for key, value in entries.items():
            optimizer.state[param][key] = value.to(device=param.device, dtype=MASTER_DTYPE)
