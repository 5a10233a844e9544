"""MaskedOptimizer: any torch.optim optimizer, with frozen entries that never move."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import unwrap_compiled
from ..errors import InvalidArgumentError, ParameterMismatchError
from ..mask import Mask
from ._wrapper import OptimizerWrapper
from .selection import Selection, check_coverage, check_fingerprint, mask_fingerprint

__all__ = ["MaskedOptimizer"]


class MaskedOptimizer(OptimizerWrapper):
    """Wrap any ``torch.optim.Optimizer`` so that only the entries selected by ``mask`` move.

    Each :meth:`step` does, for every parameter the inner optimizer holds:

    * fully selected: nothing extra, the inner optimizer updates it as usual;
    * partly selected: gradient entries at frozen positions are set to zero (so momentum and
      second-moment statistics see only selected entries), the parameter is copied, the inner
      step runs, then the frozen entries are written back from the copy: they are bit-identical
      whatever the inner optimizer does (weight decay, momentum, trust ratios, ...);
    * fully frozen (all ``False``, or not in the mask and ``requires_grad=False``): hidden from
      the inner optimizer's ``param_groups`` during its step, so it gets no state and no update.

    The wrapper honours the Optimizer contract: ``param_groups``, ``state`` and ``defaults`` are
    the inner optimizer's (so LR schedulers, ``GradScaler`` and the transformers ``Trainer``
    work), ``state_dict()`` adds the mask digest and ``load_state_dict`` refuses a state saved
    with another mask. Hooks registered on the wrapper run around the whole masked step.

    Memory: the inner optimizer's dense state (for AdamW, 2 floats per entry of every
    parameter that is not fully frozen; optimizers that build state eagerly, such as Adagrad,
    also hold it for fully frozen ones, untouched), plus a flat index of the selected entries
    of partly selected parameters (4 bytes per selected entry), plus, during ``step()`` only,
    one copy of each partly selected parameter. For state kept only for the selected entries use
    :class:`sparsetune.SparseAdamW` or :class:`sparsetune.SparseSGD`.

    Args:
        optimizer: the optimizer to wrap, built over the model's parameters.
        mask: which entries may move; must cover every parameter of ``optimizer`` that
            requires grad.
        model: the module the parameters belong to (gives their names).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> mask = Mask.top_k({n: p.abs() for n, p in model.named_parameters()}, density=0.5)
        >>> opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), mask, model)
        >>> before = model.weight.detach().clone()
        >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
        >>> bool((model.weight == before)[~mask["weight"]].all())
        True
    """

    def __init__(self, optimizer: Optimizer, mask: Mask, model: nn.Module) -> None:
        if isinstance(optimizer, MaskedOptimizer):
            raise InvalidArgumentError("optimizer is already a MaskedOptimizer; wrap it once")
        if not isinstance(mask, Mask):
            raise InvalidArgumentError(f"mask must be a sparsetune.Mask, got {type(mask).__name__}")
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
        mask.check(model)
        super().__init__(optimizer)
        self.mask = mask
        self._names = {p: n for n, p in model.named_parameters()}
        self._model_name = type(model).__name__
        self._selections: dict[Tensor, Selection] = {}
        self._register(optimizer.param_groups)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r}, mask={self.mask!r})"

    def _register(self, groups: list[dict[str, Any]]) -> None:
        for name, p in self._checked(groups):
            self._selections[p] = (
                Selection.from_mask(self.mask, name, p.device)
                if name in self.mask
                else Selection(torch.zeros(p.shape, dtype=torch.bool), p.device)  # never moves
            )

    def _checked(self, groups: list[dict[str, Any]]) -> list[tuple[str, Tensor]]:
        """The groups' parameters with their names; raise unless the mask covers them all."""
        foreign, named = [], []
        for group in groups:
            for p in group["params"]:
                if isinstance(p, tuple):  # a (name, parameter) pair: the model gives the name
                    p = p[1]
                name = self._names.get(p)
                if name is None:
                    foreign.append(tuple(p.shape))
                else:
                    named.append((name, p))
        if foreign:
            raise ParameterMismatchError(
                f"MaskedOptimizer: {len(foreign)} optimizer parameters (shapes {foreign[:5]}) "
                f"are not parameters of the {self._model_name} passed as model"
            )
        check_coverage(named, self.mask, "MaskedOptimizer")
        return named

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters must be covered by the mask.

        The parameters are checked first: a refused group leaves both optimizers unchanged.
        """
        params = param_group.get("params", [])
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        self._checked([param_group])
        self.optimizer.add_param_group(param_group)
        self._register([self.optimizer.param_groups[-1]])

    # -- the masked step ------------------------------------------------------------------
    def _mask_gradients(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                sel = self._selections[p]
                if p.grad is not None and sel.kind == "some":
                    if p.grad.is_sparse:
                        raise InvalidArgumentError(
                            "MaskedOptimizer needs dense gradients, got a sparse one (from "
                            "sparsetune.prepare's sparse-gradient mode, or "
                            "nn.Embedding(sparse=True)); use SparseAdamW or SparseSGD with "
                            "sparse gradients, or remove() the sparse-gradient mode"
                        )
                    kept = sel.gather(p.grad)
                    p.grad.zero_()
                    sel.scatter_(p.grad, kept)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Mask the gradients, run the inner step, put frozen entries back exactly."""
        masked_closure = None
        if closure is not None:

            def masked_closure() -> Any:
                with torch.enable_grad():
                    loss = closure()
                self._mask_gradients()
                return loss

        self._mask_gradients()
        groups = self.optimizer.param_groups
        # (list, its full contents): hidden in place, because an optimizer may hold on to the
        # list object itself (LBFGS keeps param_groups[0]["params"] as its own parameter list).
        hidden: list[tuple[list[Any], list[Any]]] = []
        saved: list[tuple[Tensor, Selection, Tensor]] = []
        for group in groups:
            params = group["params"]
            keep = [self._selections[p].kind != "none" for p in params]
            if not all(keep):
                names = group.get("param_names")
                for full in (params, names) if names is not None else (params,):
                    hidden.append((full, list(full)))
                    full[:] = [x for x, k in zip(full, keep) if k]
            for p in group["params"]:
                sel = self._selections[p]
                if sel.kind == "some":
                    saved.append((p, sel, p.detach().clone()))
        try:
            if not any(group["params"] for group in groups):
                # Every parameter is frozen: nothing may move (and LBFGS cannot step over none).
                loss = masked_closure() if masked_closure is not None else None
            else:
                loss = self.optimizer.step(masked_closure) if closure else self.optimizer.step()
        finally:
            for full, contents in hidden:
                full[:] = contents
            for p, sel, before in saved:
                moved = sel.gather(p)
                p.copy_(before)
                sel.scatter_(p, moved)
        return loss

    # -- state ----------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return mask_fingerprint(self.mask)

    def _load_extra_state(self, saved: dict[str, Any] | None) -> None:
        check_fingerprint(saved, self.mask, "MaskedOptimizer")
