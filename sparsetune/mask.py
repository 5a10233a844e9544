"""The parameter mask M of sparse fine-tuning, theta = theta0 + M * dtheta (theory/ E1).

A :class:`Mask` is an immutable mapping from ``model.named_parameters()`` names to boolean
tensors of the parameters' shapes. ``True`` means *trainable*; ``False`` means the entry stays
bit-identical to its pretrained value forever. There is no third meaning.

Some parameters (a freshly initialised task head, say) can be marked *always trained*: they are
fully selected and counted apart from the budget, so ``mask.density`` is the density p of the
budgeted parameters only, as in the paper.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import unwrap_compiled
from ._topk import SCOPES, budget_size, top_k_entries
from .errors import (
    InvalidMaskError,
    ParameterMismatchError,
)

__all__ = ["SCOPES", "Mask", "ParameterSummary", "budget_size"]

@dataclass(frozen=True)
class ParameterSummary:
    """Counts for one parameter of a mask."""

    name: str
    shape: tuple[int, ...]
    selected: int
    total: int
    always_train: bool

    @property
    def density(self) -> float:
        return self.selected / self.total if self.total else 0.0


def _validate_bool_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise InvalidMaskError(
            f"mask for parameter '{name}' must be a torch.Tensor of dtype torch.bool, "
            f"got {type(value).__name__}"
        )
    if value.dtype != torch.bool:
        raise InvalidMaskError(
            f"mask for parameter '{name}' must have dtype torch.bool, got {value.dtype}; "
            f"convert explicitly, e.g. `tensor != 0`"
        )
    return value


class Mask(Mapping[str, Tensor]):
    """Immutable mapping ``name -> BoolTensor`` over a model's parameters (theory/ E1).

    Build one with :meth:`top_k`, :meth:`full`, :meth:`empty` or :meth:`from_dict`; combine with
    ``|``, ``&``, ``~`` and ``-`` (elementwise on every tensor); check it against a model with
    :meth:`check`. The tensors are copied on construction; do not modify the tensors you read
    back from a mask.

    Counts (``num_selected``, ``num_total``, ``density``) cover the *budgeted* parameters only;
    parameters in ``always_train`` are fully selected and counted in ``num_always_trained``.
    """

    __slots__ = ("_always_train", "_counts", "_digest", "_tensors")

    def __init__(
        self, tensors: Mapping[str, Tensor], *, always_train: Iterable[str] = ()
    ) -> None:
        if not isinstance(tensors, Mapping):
            raise InvalidMaskError(
                f"a mask is built from a mapping of parameter names to bool tensors, "
                f"got {type(tensors).__name__}"
            )
        always = frozenset(always_train) if not isinstance(always_train, str) else {always_train}
        unknown = sorted(always - set(tensors))
        if unknown:
            raise ParameterMismatchError(
                f"always_train names parameters that are not in the mask: {unknown}; "
                f"known parameters: {sorted(tensors)[:20]}{' ...' if len(tensors) > 20 else ''}"
            )
        own: dict[str, Tensor] = {}
        for name, value in tensors.items():
            value = _validate_bool_tensor(name, value)
            own[name] = (
                torch.ones_like(value) if name in always else value.detach().clone()
            )
        self._tensors = own
        self._always_train = frozenset(always)
        self._digest: str | None = None
        self._counts = {name: int(torch.count_nonzero(t)) for name, t in own.items()}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, tensors: Mapping[str, Tensor], *, always_train: Iterable[str] = ()
    ) -> Mask:
        """Mask from a mapping of bool tensors; ``always_train`` names are set fully True."""
        return cls(tensors, always_train=always_train)

    @classmethod
    def full(cls, model: nn.Module, *, always_train: Iterable[str] = ()) -> Mask:
        """Every entry of every parameter selected (dense fine-tuning)."""
        model = unwrap_compiled(model)
        return cls(
            {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()},
            always_train=always_train,
        )

    @classmethod
    def empty(cls, model: nn.Module, *, always_train: Iterable[str] = ()) -> Mask:
        """No entry selected, except the ``always_train`` parameters."""
        model = unwrap_compiled(model)
        return cls(
            {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()},
            always_train=always_train,
        )

    @classmethod
    def top_k(
        cls,
        scores: Mapping[str, Tensor],
        density: float,
        scope: str = "global",
        *,
        always_train: Iterable[str] = (),
        targets: Iterable[str] | None = None,
    ) -> Mask:
        """Keep the entries with the largest scores (theory/ E1, E5).

        Args:
            scores: ``name -> tensor`` of finite scores, shaped like the parameters.
            density: p in (0, 1], a real number (not a string or bool); a budget of 0
                entries is an error naming the smallest density that selects one.
            scope: ``"global"`` keeps exactly k = floor(m p) entries over all budgeted
                parameters together (m = their total size; the paper's Theorem 3);
                ``"per_tensor"`` keeps floor(numel p) entries of each tensor (the authors'
                code), so a tensor smaller than 1/p entries (a 0-dim one, say) gets none.
            always_train: names selected in full and left out of m and k (a task head).
            targets: names whose entries may be chosen (default: every budgeted name). The
                budget stays k = floor(m p) over the whole model, so the mask's density is p
                wherever it is placed; ``"per_tensor"`` then keeps the same fraction
                p m / m_targets of each target. Everything else gets no entry.

        Ties are broken deterministically: among equal scores at the threshold the entry with
        the lower flat index wins, parameters taken in the order of ``scores``.
        """
        result, always = top_k_entries(
            scores, density, scope, always_train=always_train, targets=targets
        )
        return cls._wrap(result, always)

    @classmethod
    def _wrap(cls, tensors: dict[str, Tensor], always: frozenset[str]) -> Mask:
        """Take ownership of freshly made tensors without copying them again."""
        mask = cls.__new__(cls)
        mask._tensors = tensors
        mask._always_train = always
        mask._digest = None
        mask._counts = {name: int(torch.count_nonzero(t)) for name, t in tensors.items()}
        return mask

    # -- Mapping --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ParameterMismatchError(
                f"the mask has no parameter '{name}'; it has {len(self._tensors)} parameters, "
                f"e.g. {list(self._tensors)[:5]}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    # -- counts ---------------------------------------------------------------------------
    @property
    def always_train(self) -> frozenset[str]:
        """Names of the parameters trained in full and counted apart from the budget."""
        return self._always_train

    @property
    def num_total(self) -> int:
        """m: number of entries of the budgeted (not always-trained) parameters."""
        return sum(t.numel() for n, t in self._tensors.items() if n not in self._always_train)

    @property
    def num_selected(self) -> int:
        """Selected entries of the budgeted parameters (k for a mask from :meth:`top_k`)."""
        return sum(c for n, c in self._counts.items() if n not in self._always_train)

    @property
    def density(self) -> float:
        """num_selected / num_total: the density p of the budgeted parameters."""
        total = self.num_total
        return self.num_selected / total if total else 0.0

    @property
    def num_always_trained(self) -> int:
        """Entries of the always-trained parameters."""
        return sum(self._tensors[n].numel() for n in self._always_train)

    @property
    def num_trainable(self) -> int:
        """All entries that may move: num_selected + num_always_trained."""
        return self.num_selected + self.num_always_trained

    def per_parameter(self) -> dict[str, ParameterSummary]:
        """Selected and total entries of every parameter."""
        return {
            n: ParameterSummary(
                n, tuple(t.shape), self._counts[n], t.numel(), n in self._always_train
            )
            for n, t in self._tensors.items()
        }

    def summary(self, max_rows: int | None = 40) -> str:
        """A readable table: one row per parameter (largest first), then the totals."""
        rows = sorted(self.per_parameter().values(), key=lambda r: -r.total)
        shown = rows if max_rows is None else rows[:max_rows]
        width = max([len(r.name) for r in shown] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':>18}  {'selected':>12}  {'total':>12}  density"]
        for r in shown:
            tag = "  (always trained)" if r.always_train else ""
            lines.append(
                f"{r.name:<{width}}  {'x'.join(map(str, r.shape)) or 'scalar':>18}  "
                f"{r.selected:>12,}  {r.total:>12,}  {r.density:8.3%}{tag}"
            )
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more parameters")
        lines.append(
            f"budgeted: {self.num_selected:,} of {self.num_total:,} entries selected "
            f"(density {self.density:.4%}); always trained: {self.num_always_trained:,} entries "
            f"in {len(self._always_train)} parameters"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Mask(parameters={len(self)}, num_selected={self.num_selected}, "
            f"num_total={self.num_total}, density={self.density:.4%}, "
            f"always_train={sorted(self._always_train)})"
        )

    # -- identity -------------------------------------------------------------------------
    def digest(self) -> str:
        """SHA-256 of names, shapes, always-train flags and bits: equal masks, equal digests."""
        if self._digest is None:
            h = hashlib.sha256()
            for name in sorted(self._tensors):
                t = self._tensors[name]
                flag = "A" if name in self._always_train else "B"
                h.update(f"{name}\0{tuple(t.shape)}\0{flag}\0".encode())
                h.update(np.packbits(t.detach().cpu().reshape(-1).numpy()).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if set(self._tensors) != set(other._tensors) or self._always_train != other._always_train:
            return False
        return all(
            a.shape == other._tensors[n].shape and torch.equal(a, other._tensors[n].to(a.device))
            for n, a in self._tensors.items()
        )

    def __hash__(self) -> int:
        return hash(self.digest())

    # -- algebra --------------------------------------------------------------------------
    def _combine(self, other: object, op: Callable[[Tensor, Tensor], Tensor], sym: str) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        missing = sorted(set(self._tensors) - set(other._tensors))
        extra = sorted(set(other._tensors) - set(self._tensors))
        shapes = [
            f"{n}: {tuple(t.shape)} vs {tuple(other._tensors[n].shape)}"
            for n, t in self._tensors.items()
            if n in other._tensors and t.shape != other._tensors[n].shape
        ]
        if missing or extra or shapes:
            raise InvalidMaskError(
                f"cannot compute mask {sym} mask: the masks must cover the same parameters with "
                f"the same shapes; only in the left: {missing}; only in the right: {extra}; "
                f"different shapes: {shapes}"
            )
        out = {n: op(t, other._tensors[n].to(t.device)) for n, t in self._tensors.items()}
        return Mask._wrap(out, self._still_full(out, self._always_train | other._always_train))

    @staticmethod
    def _still_full(tensors: dict[str, Tensor], names: frozenset[str]) -> frozenset[str]:
        return frozenset(n for n in names if bool(tensors[n].all()))

    def __or__(self, other: object) -> Mask:
        return self._combine(other, torch.logical_or, "|")

    def __and__(self, other: object) -> Mask:
        return self._combine(other, torch.logical_and, "&")

    def __sub__(self, other: object) -> Mask:
        return self._combine(other, lambda a, b: a & ~b, "-")

    def __invert__(self) -> Mask:
        out = {n: ~t for n, t in self._tensors.items()}
        return Mask._wrap(out, self._still_full(out, self._always_train))

    def with_always_train(self, names: Iterable[str]) -> Mask:
        """A copy with ``names`` (added to the current ones) fully selected and always trained."""
        extra = frozenset([names] if isinstance(names, str) else names)
        return Mask(self._tensors, always_train=self._always_train | extra)

    def to(self, device: torch.device | str) -> Mask:
        """The same mask with its tensors on ``device``."""
        return Mask._wrap({n: t.to(device) for n, t in self._tensors.items()}, self._always_train)

    # -- files ----------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike,
        *,
        method: str = "unknown",
        model: nn.Module | None = None,
        options: Mapping[str, object] | None = None,
    ) -> Path:
        """Write a compact, versioned ``.safetensors`` mask file atomically (see sparsetune.files).

        With ``model`` the file records the model's names-and-shapes fingerprint, and
        :meth:`load` with another model is refused. ``options`` (the selection's arguments,
        JSON-encodable) are recorded beside ``method`` for ``sparsetune info``.
        """
        from .files.mask_file import save_mask

        model = None if model is None else unwrap_compiled(model)
        return save_mask(self, path, method=method, model=model, options=options)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None) -> Mask:
        """Read a mask file strictly; with ``model``, check its names and shapes too (all of the
        model's, when the file was saved with ``model=``)."""
        from .files.mask_file import load_mask

        return load_mask(path, model=None if model is None else unwrap_compiled(model))

    # -- model ----------------------------------------------------------------------------
    def check(self, model: nn.Module, *, complete: bool = False) -> Mask:
        """Raise :class:`ParameterMismatchError` unless the mask fits ``model``.

        Every name must be a parameter of ``model`` with the same shape. With ``complete=True``
        every parameter of ``model`` that requires grad must also be in the mask. All problems
        are listed in one error. Returns ``self`` so calls can be chained. A compiled model
        (``torch.compile``) is checked by its plain names.
        """
        model = unwrap_compiled(model)
        params = dict(model.named_parameters())
        unexpected = [n for n in self._tensors if n not in params]
        misshaped = [
            f"{n}: mask {tuple(t.shape)}, parameter {tuple(params[n].shape)}"
            for n, t in self._tensors.items()
            if n in params and t.shape != params[n].shape
        ]
        missing = (
            [n for n, p in params.items() if p.requires_grad and n not in self._tensors]
            if complete
            else []
        )
        if unexpected or misshaped or missing:
            parts = []
            if unexpected:
                parts.append(f"names the model lacks: {unexpected}")
            if misshaped:
                parts.append(f"wrong shapes: {misshaped}")
            if missing:
                parts.append(f"trainable parameters missing from the mask: {missing}")
            raise ParameterMismatchError(
                f"mask does not fit {type(model).__name__} "
                f"({len(params)} parameters): " + "; ".join(parts)
            )
        return self
