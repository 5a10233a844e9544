"""The compact form of one parameter's mask: what a :class:`sparsetune.Mask` holds per name.

:class:`Entries` keeps, on the parameter's device, the cheapest of three forms (the rule of the
mask files, :mod:`sparsetune.files.mask_file`):

* ``"all"``: every entry selected; nothing stored;
* ``"idx"``: the sorted flat (row-major) indices of the selected entries, int32 below 2^31
  entries, else int64, when ``count * itemsize <= ceil(numel / 8)``;
* ``"bits"``: the entries packed 8 per byte in ``numpy.packbits`` order (first entry in the
  high bit; the unused bits of the last byte are 0).

The form is a function of the selected set, so equal selections are stored identically.
Conversions work in slices of ``CHUNK`` entries: no bool per entry of a large tensor is built
unless :meth:`Entries.dense` is asked for. Imports nothing of sparsetune but ``errors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InvalidMaskError, ParameterMismatchError

__all__ = [
    "CHUNK", "Entries", "ParameterSummary", "check_always", "check_bool_tensor", "index_dtype",
]

CHUNK = 1 << 24  # entries per slice when converting between forms (a multiple of 8)


def index_dtype(numel: int) -> torch.dtype:
    """int32 for a tensor of fewer than 2^31 entries, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


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


def check_bool_tensor(name: str, value: object) -> Tensor:
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


def check_always(names: str | Iterable[str], known: Mapping[str, object]) -> frozenset[str]:
    always = frozenset([names] if isinstance(names, str) else names)
    unknown = sorted(always - set(known))
    if unknown:
        raise ParameterMismatchError(
            f"always_train names parameters that are not in the mask: {unknown}; "
            f"known parameters: {sorted(known)[:20]}{' ...' if len(known) > 20 else ''}"
        )
    return always


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack(flat: Tensor) -> Tensor:
    """A 1-D bool tensor packed 8 per byte, first entry in the high bit (``numpy.packbits``)."""
    out = []
    shifts = _shifts(flat.device)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK].to(torch.uint8)
        if part.numel() % 8:
            part = torch.cat([part, part.new_zeros(8 - part.numel() % 8)])
        out.append((part.view(-1, 8) << shifts).sum(1, dtype=torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8, device=flat.device)


def unpack(bits: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack`: ``numel`` bools."""
    shifts = _shifts(bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


def popcount(bits: Tensor) -> int:
    """Number of set bits of a uint8 tensor (SWAR, in slices)."""
    total = 0
    for start in range(0, bits.numel(), CHUNK):
        x = bits[start:start + CHUNK]
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        total += int(((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64))
    return total


class Entries:
    """The selected entries of one parameter of ``shape`` on ``device``; see the module doc.

    Build with :meth:`from_bool`, :meth:`from_sorted`, :meth:`from_packed`, :meth:`full` or
    :meth:`none`; never mutated.
    """

    __slots__ = ("count", "data", "device", "kind", "numel", "shape")

    def __init__(self, shape: torch.Size, device: torch.device, kind: str,
                 data: Tensor | None, count: int) -> None:
        self.shape, self.device, self.kind, self.data, self.count = (
            torch.Size(shape), torch.device(device), kind, data, count)
        self.numel = self.shape.numel()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def full(cls, shape, device) -> Entries:
        shape = torch.Size(shape)
        if shape.numel() == 0:
            return cls.none(shape, device)
        return cls(shape, device, "all", None, shape.numel())

    @classmethod
    def none(cls, shape, device) -> Entries:
        shape = torch.Size(shape)
        empty = torch.zeros(0, dtype=index_dtype(shape.numel()), device=device)
        return cls(shape, device, "idx", empty, 0)

    @staticmethod
    def _indices_smaller(count: int, numel: int) -> bool:
        itemsize = 4 if index_dtype(numel) == torch.int32 else 8
        return count * itemsize <= (numel + 7) // 8

    @classmethod
    def from_sorted(cls, index: Tensor, shape) -> Entries:
        """From sorted, unique, in-range flat indices (not checked: see from_user_indices)."""
        shape = torch.Size(shape)
        numel, count = shape.numel(), index.numel()
        if count == numel and numel > 0:
            return cls(shape, index.device, "all", None, count)
        if cls._indices_smaller(count, numel):
            return cls(shape, index.device, "idx", index.to(index_dtype(numel)), count)
        return cls(shape, index.device, "bits", _index_bits(index, numel), count)

    @classmethod
    def from_packed(cls, bits: Tensor, shape, name: str = "?", count: int | None = None
                    ) -> Entries:
        """From ``numpy.packbits``-ordered bytes (checked: uint8, length, zero padding)."""
        shape = torch.Size(shape)
        numel = shape.numel()
        if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 \
                or bits.numel() != (numel + 7) // 8:
            raise InvalidMaskError(
                f"packed bits of '{name}' must be a 1-D uint8 tensor of {(numel + 7) // 8} "
                f"bytes for {numel} entries, got {getattr(bits, 'dtype', type(bits).__name__)}"
                f" of shape {tuple(getattr(bits, 'shape', ()))}"
            )
        if numel % 8 and int(bits[-1]) & (0xFF >> (numel % 8)):
            raise InvalidMaskError(f"packed bits of '{name}': padding bits past {numel} are set")
        count = popcount(bits) if count is None else count
        if count == numel and numel > 0:
            return cls(shape, bits.device, "all", None, count)
        if cls._indices_smaller(count, numel):
            return cls(shape, bits.device, "idx", _bit_indices(bits, numel), count)
        return cls(shape, bits.device, "bits", bits.clone(), count)

    @classmethod
    def from_bool(cls, value: Tensor) -> Entries:
        flat = value.reshape(-1)
        count, numel = int(torch.count_nonzero(flat)), flat.numel()
        if count == numel:
            return cls.full(value.shape, value.device)
        if cls._indices_smaller(count, numel):
            return cls.from_sorted(torch.nonzero(flat).squeeze(1), value.shape)
        return cls(value.shape, value.device, "bits", pack(flat), count)

    @classmethod
    def from_user_indices(cls, index: Tensor, shape, name: str) -> Entries:
        """From unique flat indices in any order, checked."""
        shape = torch.Size(shape)
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() \
                or index.dtype == torch.bool or index.is_complex():
            raise InvalidMaskError(
                f"indices of '{name}' must be a 1-D integer tensor, got "
                f"{getattr(index, 'dtype', type(index).__name__)} of shape "
                f"{tuple(getattr(index, 'shape', ()))}"
            )
        index = torch.sort(index.long()).values
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= shape.numel()):
            raise InvalidMaskError(
                f"indices of '{name}' must lie in [0, {shape.numel()}), got "
                f"{int(index[0])}..{int(index[-1])}"
            )
        if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
            raise InvalidMaskError(f"indices of '{name}' repeat an entry")
        return cls.from_sorted(index, shape)

    # -- reads ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def dense(self) -> Tensor:
        """A new bool tensor of ``shape``."""
        if self.kind == "all":
            return torch.ones(self.shape, dtype=torch.bool, device=self.device)
        if self.kind == "bits":
            return unpack(self.data, self.numel).reshape(self.shape)
        flat = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        flat[self.data] = True
        return flat.reshape(self.shape)

    def indices(self) -> Tensor:
        """Sorted flat indices (int32 below 2^31 entries, else int64)."""
        if self.kind == "idx":
            return self.data
        if self.kind == "all":
            return torch.arange(self.numel, dtype=index_dtype(self.numel), device=self.device)
        return _bit_indices(self.data, self.numel)

    def bits(self) -> Tensor:
        """The entries packed 8 per byte (``numpy.packbits`` order)."""
        if self.kind == "bits":
            return self.data
        if self.kind == "all":
            bits = torch.full(((self.numel + 7) // 8,), 255, dtype=torch.uint8,
                              device=self.device)
            if self.numel % 8:
                bits[-1] = (0xFF << (8 - self.numel % 8)) & 0xFF
            return bits
        return _index_bits(self.data, self.numel)

    def contains(self, index: Tensor) -> Tensor:
        """Bool per flat index in ``index``: is that entry selected?"""
        index = index.to(self.device)
        if self.kind == "all":
            return torch.ones(index.shape, dtype=torch.bool, device=self.device)
        if self.kind == "idx":
            if self.count == 0:
                return torch.zeros(index.shape, dtype=torch.bool, device=self.device)
            at = torch.searchsorted(self.data, index.to(self.data.dtype)).clamp_(max=self.count - 1)
            return self.data[at] == index
        index = index.long()
        return ((self.data[index >> 3] >> (7 - (index & 7)).to(torch.uint8)) & 1).bool()

    def same(self, other: Entries) -> bool:
        if self.shape != other.shape or self.count != other.count or self.kind != other.kind:
            return False
        return self.data is None or torch.equal(self.data, other.data.to(self.device))

    # -- algebra --------------------------------------------------------------------------
    def _from_bits(self, bits: Tensor) -> Entries:
        return Entries.from_packed(bits, self.shape)

    def combine(self, other: Entries, sym: str) -> Entries:
        """``self | other``, ``self & other`` or ``self - other``, on ``self``'s device."""
        other = other.to(self.device)
        if sym == "|":
            if "all" in (self.kind, other.kind):
                return Entries.full(self.shape, self.device)
            if self.kind == other.kind == "idx":
                both = torch.unique(torch.cat([self.data, other.data]))
                return Entries.from_sorted(both, self.shape)
            return self._from_bits(self.bits() | other.bits())
        if sym == "&":
            if self.kind == "idx":
                return Entries.from_sorted(self.data[other.contains(self.data)], self.shape)
            if other.kind == "idx":
                return Entries.from_sorted(other.data[self.contains(other.data)], self.shape)
            if other.kind == "all":
                return self
            if self.kind == "all":
                return other
            return self._from_bits(self.bits() & other.bits())
        if self.kind == "idx":
            return Entries.from_sorted(self.data[~other.contains(self.data)], self.shape)
        if other.kind == "all":
            return Entries.none(self.shape, self.device)
        return self._from_bits(self.bits() & ~other.bits())

    def invert(self) -> Entries:
        if self.kind == "all":
            return Entries.none(self.shape, self.device)
        if self.count == 0:
            return Entries.full(self.shape, self.device)
        bits = ~self.bits()
        if self.numel % 8:
            bits[-1] &= (0xFF << (8 - self.numel % 8)) & 0xFF
        return Entries.from_packed(bits, self.shape, count=self.numel - self.count)

    def to(self, device) -> Entries:
        device = torch.device(device)
        data = None if self.data is None else self.data.to(device)
        return Entries(self.shape, device, self.kind, data, self.count)


def _index_bits(index: Tensor, numel: int) -> Tensor:
    """Packed bits with the entries ``index`` (unique) set."""
    bits = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=index.device)
    index = index.long()
    bits.index_add_(0, index >> 3, (128 >> (index & 7)).to(torch.uint8))
    return bits


def _bit_indices(bits: Tensor, numel: int) -> Tensor:
    """Sorted flat indices of the set bits, in slices (no bool per entry of the whole)."""
    dtype, step = index_dtype(numel), CHUNK // 8
    parts = [
        torch.nonzero(unpack(bits[start:start + step], min(CHUNK, numel - 8 * start)))
        .squeeze(1).add_(8 * start).to(dtype)
        for start in range(0, bits.numel(), step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=bits.device)
