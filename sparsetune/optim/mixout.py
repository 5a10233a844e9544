"""Mixout (Lee, Cho and Kang, ICLR 2020) as an optimizer wrapper: a random mask every step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import InvalidArgumentError, StateMismatchError
from ._wrapper import OptimizerWrapper

__all__ = ["Mixout"]


class Mixout(OptimizerWrapper):
    r"""Wrap any optimizer so that every step trains the mixed-out parameters of Lee et al.

    What is implemented (the element-wise ``mixout(u)`` of the paper, i.e. "mixconnect" with
    the target u = theta0): the optimizer keeps the trained parameters w; before each forward
    pass the model holds

        Phi(w) = u + M_t (w - u) / (1 - p),   M_t,ii ~ Bernoulli(1 - p) independently,

    which is the paper's (1/(1-p)) ((I - M) u + M w - p u): each entry is "mixed" back to its
    pretrained value u with probability p = ``mix_p``, and the others are rescaled so that
    E[Phi(w)] = w. The gradient the inner optimizer sees is the chain rule through Phi,
    dL/dw = M_t / (1 - p) * dL/dPhi, so only the kept entries learn at step t. In the paper's
    terms this is random sparse fine-tuning with a mask redrawn every step (theory/ E1 with
    M_t random, dtheta = (w - u) / (1 - p)); in expectation it regularises towards theta0 (E2).
    Lee et al. mix whole neurons (all outgoing weights of a unit) in ``mixout(u)`` and single
    entries in mixconnect; here every entry is drawn independently.

    Protocol (the model holds Phi(w), not w, between steps, as dropout's training mode does):

    * build the wrapper on the pretrained model: u is read from the parameters at that moment,
      and the first Phi is written into them;
    * ``loss.backward(); opt.step()`` as usual: each step turns the gradient at Phi into the
      gradient at w, runs the inner step on w, draws a new mask and writes the new Phi;
    * evaluate inside ``with opt.unmixed():`` (the model holds w), and call
      :meth:`finalize` once training is over: it writes w into the model for good.

    Compose with a fixed mask by putting the mask inside: ``Mixout(MaskedOptimizer(opt, mask,
    model), 0.9)``: a frozen entry keeps w = u, so Phi = u there and it never moves
    (bit-identical). The other order cannot work (the mask would restore the model after
    Mixout has read w from it) and is refused at the next step: every step checks that the
    model still holds the Phi written after the previous one, and raises
    :class:`~sparsetune.errors.StateMismatchError` if anything else changed it.
    Masks come from a private generator per device seeded with ``seed``; ``state_dict()`` saves
    w, u, the current mask and the generators, so a resumed run continues exactly.

    Memory: two copies of every parameter the inner optimizer holds (w and u) and a boolean
    mask (1 byte per entry).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the pretrained model's parameters.
        mix_p: p in [0, 1), the probability that an entry is mixed back to u at a step (the
            paper's best BERT runs used p = 0.7 to 0.9). p = 0 is the inner optimizer.
        seed: seed of the mask generators.
    """

    def __init__(self, optimizer: Optimizer, mix_p: float, *, seed: int = 0) -> None:
        if isinstance(mix_p, bool) or not isinstance(mix_p, (int, float)) or not (
            0.0 <= mix_p < 1.0
        ):
            raise InvalidArgumentError(f"mix_p must be in [0, 1), got mix_p={mix_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgumentError(f"seed must be an integer, got seed={seed!r}")
        super().__init__(optimizer)
        self.mix_p = float(mix_p)
        self.seed = seed
        self.finalized = False
        self._generators: dict[str, torch.Generator] = {}
        self._target: dict[Tensor, Tensor] = {}  # u
        self._weights: dict[Tensor, Tensor] = {}  # w
        self._kept: dict[Tensor, Tensor] = {}  # M_t
        with torch.no_grad():
            for p in self._params():
                self._target[p] = p.detach().clone()
                self._weights[p] = p.detach().clone()
            self._draw_and_mix()

    def __repr__(self) -> str:
        return f"Mixout({self.optimizer!r}, mix_p={self.mix_p})"

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _mixed(self, p: Tensor) -> Tensor:
        """Phi(w) = u + M (w - u) / (1 - p); exactly u where M = 0 or w = u."""
        u, w = self._target[p], self._weights[p]
        if self.mix_p == 0.0:
            return w
        moved = self._kept[p] & (w != u)
        return torch.where(moved, u + (w - u) / (1.0 - self.mix_p), u)

    @torch.no_grad()
    def _draw_and_mix(self) -> None:
        for p in self._params():
            self._kept[p] = torch.empty(p.shape, dtype=torch.float32, device=p.device).bernoulli_(
                1.0 - self.mix_p, generator=self._generator(p.device)
            ).bool()
            p.copy_(self._mixed(p))

    def _check_open(self) -> None:
        if self.finalized:
            raise InvalidArgumentError(
                "Mixout.finalize() was called: the model holds the trained weights and the "
                "optimizer takes no more steps"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its current values are its targets u."""
        self._check_open()
        self.optimizer.add_param_group(param_group)
        with torch.no_grad():
            for p in self.optimizer.param_groups[-1]["params"]:
                self._target[p] = p.detach().clone()
                self._weights[p] = p.detach().clone()
                self._kept[p] = torch.ones(p.shape, dtype=torch.bool, device=p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Chain rule through Phi, the inner step on w, a new mask, the new Phi in the model.

        A ``closure`` is evaluated once, at Phi, before the inner step (which then runs
        without it): optimizers that re-evaluate the loss (LBFGS) are not supported.
        """
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_untouched()
        scale = 1.0 / (1.0 - self.mix_p)
        for p in self._params():
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise InvalidArgumentError("Mixout does not support sparse gradients")
                p.grad.mul_(self._kept[p]).mul_(scale)
            p.copy_(self._weights[p])
        try:
            self.optimizer.step()
        finally:
            for p in self._params():
                self._weights[p].copy_(p)
            self._draw_and_mix()
        return loss

    def _check_untouched(self) -> None:
        changed = [
            tuple(p.shape) for p in self._params() if not torch.equal(p.detach(), self._mixed(p))
        ]
        if changed:
            raise StateMismatchError(
                f"Mixout.step: {len(changed)} parameters (shapes {changed[:5]}) were changed "
                f"outside Mixout since its last step, so its trained weights w no longer match "
                f"the model. Change weights only inside `with opt.unmixed():`, and compose a "
                f"fixed mask as Mixout(MaskedOptimizer(opt, mask, model), mix_p), not the other "
                f"way round"
            )

    @contextlib.contextmanager
    def unmixed(self) -> Iterator[None]:
        """Inside, the model holds the trained weights w (for evaluation); Phi comes back after."""
        self._check_open()
        with torch.no_grad():
            for p in self._params():
                p.copy_(self._weights[p])
        try:
            yield
        finally:
            with torch.no_grad():
                for p in self._params():
                    self._weights[p].copy_(p)  # edits made inside (a manual reset) are kept
                    p.copy_(self._mixed(p))

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the trained weights w into the model for good (end of training)."""
        self._check_open()
        for p in self._params():
            p.copy_(self._weights[p])
        self.finalized = True

    def _extra_state(self) -> dict[str, Any]:
        params = self._params()
        return {
            "kind": "mixout",
            "mix_p": self.mix_p,
            "seed": self.seed,
            "finalized": self.finalized,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "weights": [self._weights[p].clone() for p in params],
            "targets": [self._target[p].clone() for p in params],
            "kept": [self._kept[p].clone() for p in params],
        }

    def _load_extra_state(self, saved: dict[str, Any] | None) -> None:
        if saved is None or saved.get("kind") != "mixout":
            raise StateMismatchError(
                "Mixout.load_state_dict: the state was not saved by Mixout "
                f"(found {None if saved is None else saved.get('kind')!r})"
            )
        if saved["mix_p"] != self.mix_p:
            raise StateMismatchError(
                f"Mixout.load_state_dict: saved with mix_p={saved['mix_p']}, this optimizer has "
                f"mix_p={self.mix_p}"
            )
        params = self._params()
        shapes = [tuple(p.shape) for p in params]
        if [tuple(w.shape) for w in saved["weights"]] != shapes:
            raise StateMismatchError(
                "Mixout.load_state_dict: the saved weights do not match this optimizer's "
                f"parameters (shapes {[tuple(w.shape) for w in saved['weights']][:5]} vs "
                f"{shapes[:5]})"
            )
        with torch.no_grad():
            for p, w, u, kept in zip(params, saved["weights"], saved["targets"], saved["kept"]):
                self._weights[p] = w.to(device=p.device, dtype=p.dtype).clone()
                self._target[p] = u.to(device=p.device, dtype=p.dtype).clone()
                self._kept[p] = kept.to(p.device).clone()
                p.copy_(self._weights[p] if saved["finalized"] else self._mixed(p))
        for key, state in saved["generators"].items():
            self._generator(torch.device(key)).set_state(state)
        self.finalized = bool(saved["finalized"])
