"""The parameter mask M of sparse fine-tuning, theta = theta0 + M * dtheta (theory/ E1).

A :class:`Mask` is an immutable mapping from ``model.named_parameters()`` names to boolean
tensors of the parameters' shapes. ``True`` means *trainable*; ``False`` means the entry stays
bit-identical to its pretrained value forever. There is no third meaning.

In memory a mask is compact: per parameter it holds, on the parameter's device, the sorted
flat indices of the selected entries (int32 below 2^31 entries, else int64), or the entries
packed 8 per byte (``numpy.packbits`` order) where that is smaller, or nothing at all when
every entry is selected: the rule of the mask files. A p = 0.5% mask of 1.1B entries holds
22 MB. ``mask[name]`` builds the bool tensor when asked; :meth:`Mask.indices`,
:meth:`Mask.count` and :meth:`Mask.shape` read the compact form without one.

Some parameters (a freshly initialised task head, say) can be marked *always trained*: they are
fully selected and counted apart from the budget, so ``mask.density`` is the density p of the
budgeted parameters only, as in the paper.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checks import logical_shape, unwrap_compiled
from ._mask_storage import Entries, ParameterSummary, check_always, check_bool_tensor
from ._topk import SCOPES, budget_size, top_k_entries
from .errors import InvalidMaskError, ParameterMismatchError

__all__ = ["SCOPES", "Mask", "ParameterSummary", "budget_size"]


class Mask(Mapping[str, Tensor]):
    """Immutable mapping ``name -> BoolTensor`` over a model's parameters (theory/ E1).

    Build one with :meth:`top_k`, :meth:`full`, :meth:`empty`, :meth:`from_names`,
    :meth:`from_dict` or :meth:`from_indices`; combine with ``|``, ``&``, ``~`` and ``-``
    (elementwise on every tensor); check it against a model with :meth:`check`. ``mask[name]``
    is a fresh bool tensor built from the compact form on each call (one byte per entry of
    that parameter): hot paths read :meth:`indices` and :meth:`count` instead.

    Counts (``num_selected``, ``num_total``, ``density``) cover the *budgeted* parameters only;
    parameters in ``always_train`` are fully selected and counted in ``num_always_trained``.
    """

    __slots__ = ("_always_train", "_digest", "_entries")

    def __init__(
        self, tensors: Mapping[str, Tensor], *, always_train: Iterable[str] = ()
    ) -> None:
        if not isinstance(tensors, Mapping):
            raise InvalidMaskError(
                f"a mask is built from a mapping of parameter names to bool tensors, "
                f"got {type(tensors).__name__}"
            )
        always = check_always(always_train, tensors)
        own: dict[str, Entries] = {}
        for name, value in tensors.items():
            value = check_bool_tensor(name, value).detach()
            own[name] = (Entries.full(value.shape, value.device) if name in always
                         else Entries.from_bool(value))
        self._set(own, always)

    def _set(self, entries: dict[str, Entries], always: frozenset[str]) -> None:
        self._entries = entries
        self._always_train = always
        self._digest: str | None = None

    @classmethod
    def _wrap(cls, entries: dict[str, Entries], always: frozenset[str]) -> Mask:
        mask = cls.__new__(cls)
        mask._set(entries, always)
        return mask

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, tensors: Mapping[str, Tensor], *, always_train: Iterable[str] = ()
    ) -> Mask:
        """Mask from a mapping of bool tensors; ``always_train`` names are set fully True."""
        return cls(tensors, always_train=always_train)

    @classmethod
    def from_indices(
        cls,
        shapes: Mapping[str, Sequence[int]],
        indices: Mapping[str, Tensor] | None = None,
        *,
        packed: Mapping[str, Tensor] | None = None,
        always_train: Iterable[str] = (),
    ) -> Mask:
        """Mask over parameters of ``shapes`` without a bool per entry.

        ``indices[name]``: the selected flat (row-major) indices, a 1-D integer tensor, unique,
        in any order; ``packed[name]``: the entries packed 8 per byte as ``numpy.packbits``
        writes them (uint8, ``ceil(numel / 8)`` bytes). A name in neither selects nothing. The
        compact form lives on the device of the tensor given (CPU for names in neither).
        """
        indices, packed = dict(indices or {}), dict(packed or {})
        extra = sorted((set(indices) | set(packed)) - set(shapes))
        both = sorted(set(indices) & set(packed))
        if extra or both:
            raise ParameterMismatchError(f"from_indices: names without a shape {extra}; names "
                                         f"given both indices and packed bits {both}")
        always, own = check_always(always_train, shapes), {}
        for name, shape in shapes.items():
            given = packed.get(name, indices.get(name))
            device = given.device if isinstance(given, Tensor) else "cpu"
            if name in always:
                own[name] = Entries.full(shape, device)
            elif name in packed:
                own[name] = Entries.from_packed(packed[name], shape, name)
            elif name in indices:
                own[name] = Entries.from_user_indices(indices[name], shape, name)
            else:
                own[name] = Entries.none(shape, device)
        return cls._wrap(own, always)

    @classmethod
    def from_names(
        cls, model: nn.Module | Mapping[str, Tensor], names: Iterable[str], *,
        always_train: Iterable[str] = (),
    ) -> Mask:
        """Every entry of the parameters in ``names``, none of the others' (no bool per entry),
        over ``model.named_parameters()`` or a mapping of name to parameter."""
        params = (dict(model) if isinstance(model, Mapping)
                  else dict(unwrap_compiled(model).named_parameters()))
        chosen = frozenset([names] if isinstance(names, str) else names)
        unknown = sorted(chosen - set(params))
        if unknown:
            raise ParameterMismatchError(f"from_names: the model has no parameters {unknown}")
        always = check_always(always_train, params)
        return cls._wrap(
            {n: (Entries.full if n in chosen | always else Entries.none)(p.shape, p.device)
             for n, p in params.items()},
            always,
        )

    @classmethod
    def full(cls, model: nn.Module, *, always_train: Iterable[str] = ()) -> Mask:
        """Every entry of every parameter selected (dense fine-tuning)."""
        model = unwrap_compiled(model)
        return cls.from_names(model, [n for n, _ in model.named_parameters()],
                              always_train=always_train)

    @classmethod
    def empty(cls, model: nn.Module, *, always_train: Iterable[str] = ()) -> Mask:
        """No entry selected, except the ``always_train`` parameters."""
        return cls.from_names(model, (), always_train=always_train)

    @classmethod
    def top_k(
        cls,
        scores: Mapping[str, Tensor],
        density: float,
        scope: str = "global",
        *,
        always_train: Iterable[str] = (),
        targets: Iterable[str] | None = None,
        progress: bool = False,
    ) -> Mask:
        """Keep the entries with the largest scores (theory/ E1, E5).

        Args:
            scores: ``name -> tensor`` of finite scores, shaped like the parameters; a
                ``LazyScores`` (what ``magnitude_scores`` returns) computes them when read,
                one slice of one tensor at a time.
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
            progress: tqdm bars over the tensors scored, then merged (tensors/s).

        Ties are broken deterministically: among equal scores at the threshold the entry with
        the lower flat index wins, parameters taken in the order of ``scores``. The top k is
        exact but streamed: slices of each tensor's scores are merged into a running top k.
        """
        entries, always = top_k_entries(scores, density, scope, always_train=always_train,
                                        targets=targets, progress=progress)
        return cls._wrap(entries, always)

    # -- Mapping --------------------------------------------------------------------------
    def _get(self, name: str) -> Entries:
        try:
            return self._entries[name]
        except KeyError:
            raise ParameterMismatchError(
                f"the mask has no parameter '{name}'; it has {len(self._entries)} parameters, "
                f"e.g. {list(self._entries)[:5]}"
            ) from None

    def __getitem__(self, name: str) -> Tensor:
        """A new bool tensor of the parameter's shape, on the parameter's device."""
        return self._get(name).dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    # -- compact reads --------------------------------------------------------------------
    def indices(self, name: str) -> Tensor:
        """Sorted flat indices of the selected entries of ``name`` (int32 below 2^31 entries,
        else int64), on its device: stored as such unless the parameter is mostly selected."""
        return self._get(name).indices()

    def packed_bits(self, name: str) -> Tensor:
        """The entries of ``name`` packed 8 per byte (uint8, ``numpy.packbits`` order)."""
        return self._get(name).bits()

    def count(self, name: str) -> int:
        """Number of selected entries of ``name`` (no tensor is built)."""
        return self._get(name).count

    def shape(self, name: str) -> torch.Size:
        """Shape of parameter ``name``."""
        return self._get(name).shape

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the mask holds in memory."""
        return sum(e.nbytes for e in self._entries.values())

    # -- counts ---------------------------------------------------------------------------
    @property
    def always_train(self) -> frozenset[str]:
        """Names of the parameters trained in full and counted apart from the budget."""
        return self._always_train

    @property
    def num_total(self) -> int:
        """m: number of entries of the budgeted (not always-trained) parameters."""
        return sum(e.numel for n, e in self._entries.items() if n not in self._always_train)

    @property
    def num_selected(self) -> int:
        """Selected entries of the budgeted parameters (k for a mask from :meth:`top_k`)."""
        return sum(e.count for n, e in self._entries.items() if n not in self._always_train)

    @property
    def density(self) -> float:
        """num_selected / num_total: the density p of the budgeted parameters."""
        total = self.num_total
        return self.num_selected / total if total else 0.0

    @property
    def num_always_trained(self) -> int:
        """Entries of the always-trained parameters."""
        return sum(self._entries[n].numel for n in self._always_train)

    @property
    def num_trainable(self) -> int:
        """All entries that may move: num_selected + num_always_trained."""
        return self.num_selected + self.num_always_trained

    def per_parameter(self) -> dict[str, ParameterSummary]:
        """Selected and total entries of every parameter."""
        return {
            n: ParameterSummary(n, tuple(e.shape), e.count, e.numel, n in self._always_train)
            for n, e in self._entries.items()
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
            for name in sorted(self._entries):
                e = self._entries[name]
                flag = "A" if name in self._always_train else "B"
                h.update(f"{name}\0{tuple(e.shape)}\0{flag}\0".encode())
                h.update(memoryview(e.bits().cpu().numpy()))
            self._digest = h.hexdigest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if set(self._entries) != set(other._entries) or self._always_train != other._always_train:
            return False
        return all(e.same(other._entries[n]) for n, e in self._entries.items())

    def __hash__(self) -> int:
        return hash(self.digest())

    # -- algebra --------------------------------------------------------------------------
    def _combine(self, other: object, sym: str) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        mine, theirs = self._entries, other._entries
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        shapes = [
            f"{n}: {tuple(e.shape)} vs {tuple(theirs[n].shape)}"
            for n, e in mine.items()
            if n in theirs and e.shape != theirs[n].shape
        ]
        if missing or extra or shapes:
            raise InvalidMaskError(
                f"cannot compute mask {sym} mask: the masks must cover the same parameters with "
                f"the same shapes; only in the left: {missing}; only in the right: {extra}; "
                f"different shapes: {shapes}"
            )
        out = {n: e.combine(theirs[n], sym) for n, e in mine.items()}
        return Mask._wrap(out, self._still_full(out, self._always_train | other._always_train))

    @staticmethod
    def _still_full(entries: dict[str, Entries], names: frozenset[str]) -> frozenset[str]:
        return frozenset(n for n in names if entries[n].count == entries[n].numel)

    def __or__(self, other: object) -> Mask:
        return self._combine(other, "|")

    def __and__(self, other: object) -> Mask:
        return self._combine(other, "&")

    def __sub__(self, other: object) -> Mask:
        return self._combine(other, "-")

    def __invert__(self) -> Mask:
        out = {n: e.invert() for n, e in self._entries.items()}
        return Mask._wrap(out, self._still_full(out, self._always_train))

    def with_always_train(self, names: Iterable[str]) -> Mask:
        """A copy with ``names`` (added to the current ones) fully selected and always trained."""
        always = self._always_train | check_always(names, self._entries)
        return Mask._wrap(
            {n: Entries.full(e.shape, e.device) if n in always else e
             for n, e in self._entries.items()},
            always,
        )

    def to(self, device: torch.device | str) -> Mask:
        """The same mask with its compact tensors on ``device``."""
        return Mask._wrap({n: e.to(device) for n, e in self._entries.items()},
                          self._always_train)

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

        Every name must be a parameter of ``model`` with the same shape (the logical shape of
        a bitsandbytes 4-bit weight, :func:`~sparsetune._checks.logical_shape`). With
        ``complete=True`` every parameter of ``model`` that requires grad must also be in the
        mask. All problems are listed in one error. Returns ``self`` so calls can be chained. A
        compiled model (``torch.compile``) is checked by its plain names.
        """
        model = unwrap_compiled(model)
        params = dict(model.named_parameters())
        unexpected = [n for n in self._entries if n not in params]
        misshaped = [
            f"{n}: mask {tuple(e.shape)}, parameter {tuple(logical_shape(params[n]))}"
            for n, e in self._entries.items()
            if n in params and e.shape != logical_shape(params[n])
        ]
        missing = (
            [n for n, p in params.items() if p.requires_grad and n not in self._entries]
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
