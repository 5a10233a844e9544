"""SparseDelta: the task-specific change theta - theta0 on the mask, as a small shippable object.

``SparseDelta.extract(model, base_state_dict, mask)`` records the selected entries of a
fine-tuned model (theory/ E1: theta = theta0 + M dtheta); ``apply_to`` turns the base into the
fine-tuned model, ``revert_from`` turns it back, :func:`merge_deltas` combines task deltas over
the same base. A fingerprint of the base parameters travels with the delta, so applying it to
another model fails loudly.

For every entry of its support a delta keeps both values, theta0 and theta, in the parameter's
own dtype (int32 flat index + 2 values: 12 bytes per fp32 entry, 8 per bf16 entry). That makes
``apply_to(base)`` and ``revert_from(tuned)`` exact, bit for bit, in every dtype; dtheta itself
is computed in float64 when it is needed (scaling, merging, :meth:`SparseDelta.to_dense`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError, ParameterMismatchError, SparsetuneError
from .mask import Mask

__all__ = ["MERGE_POLICIES", "BaseModelMismatchError", "DeltaEntry", "SparseDelta",
           "base_fingerprint", "merge_deltas"]

MERGE_POLICIES = ("sum", "mean", "error")


class BaseModelMismatchError(SparsetuneError, ValueError):
    """A delta is applied to (or reverted from) a model that is not its base (or tuned) model."""


def base_fingerprint(params: Mapping[str, Tensor]) -> str:
    """SHA-256 of the names, shapes, dtypes and exact bytes of ``params`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DeltaEntry:
    """One parameter's support: flat indices (None = every entry), theta0 and theta there."""

    shape: tuple[int, ...]
    index: Tensor | None
    base: Tensor  # 1-D, parameter dtype
    tuned: Tensor  # 1-D, parameter dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def numel(self) -> int:
        """Entries of the whole parameter (not of the support)."""
        return math.prod(self.shape)

    def delta64(self) -> Tensor:
        return self.tuned.to(torch.float64) - self.base.to(torch.float64)


def _gather(t: Tensor, index: Tensor | None) -> Tensor:
    flat = t.detach().reshape(-1)
    return flat.clone() if index is None else flat[index.to(flat.device)]


class SparseDelta:
    """theta - theta0 on the support of a mask, with the base model's fingerprint."""

    def __init__(
        self,
        entries: Mapping[str, DeltaEntry],
        base_fingerprint: str,
        method: str = "unknown",
        info: Mapping[str, str] | None = None,
    ) -> None:
        self._entries = dict(entries)
        self.base_fingerprint = base_fingerprint
        self.method = method
        #: Free-form strings saved with the delta (e.g. the transformers architecture and
        #: number of labels of the tuned model, which ``sparsetune delta apply`` rebuilds).
        self.info: dict[str, str] = {str(k): str(v) for k, v in (info or {}).items()}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def extract(
        cls,
        model: nn.Module,
        base_state_dict: Mapping[str, Tensor],
        mask: Mask,
        *,
        method: str = "unknown",
        strict: bool = True,
        info: Mapping[str, str] | None = None,
    ) -> SparseDelta:
        """The change of ``model`` from ``base_state_dict`` on the entries ``mask`` selects.

        With ``strict=True`` (default) every entry outside the mask must equal the base, so the
        delta captures the whole change; otherwise :class:`BaseModelMismatchError` lists the
        parameters that moved outside the mask.
        """
        params = dict(model.named_parameters())
        mask.check(model)
        missing = [n for n in params if n not in base_state_dict]
        shapes = [
            f"{n}: base {tuple(base_state_dict[n].shape)} {base_state_dict[n].dtype}, "
            f"model {tuple(p.shape)} {p.dtype}"
            for n, p in params.items()
            if n in base_state_dict
            and (base_state_dict[n].shape != p.shape or base_state_dict[n].dtype != p.dtype)
        ]
        if missing or shapes:
            raise ParameterMismatchError(
                f"base_state_dict does not match the model: missing {missing}; "
                f"mismatched {shapes}"
            )
        base = {n: base_state_dict[n].detach() for n in params}
        moved_outside, entries = [], {}
        for name, p in params.items():
            new, old = p.detach(), base[name].to(p.device)
            selected = mask[name].to(new.device) if name in mask else None
            if strict:
                outside = new != old if selected is None else (new != old) & ~selected
                count = int(outside.sum())
                if count:
                    moved_outside.append(f"{name} ({count} entries)")
            if selected is None or not bool(selected.any()):
                continue
            index = None if bool(selected.all()) else torch.nonzero(selected.reshape(-1))[:, 0]
            entries[name] = DeltaEntry(
                tuple(new.shape), index, _gather(old, index), _gather(new, index)
            )
        if moved_outside:
            raise BaseModelMismatchError(
                f"the model differs from the base outside the mask in {moved_outside}; the delta "
                f"would not reproduce it (pass strict=False to keep only the masked change)"
            )
        return cls(entries, base_fingerprint(base), method, info)

    # -- counts ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    @property
    def entries(self) -> Mapping[str, DeltaEntry]:
        """``name -> DeltaEntry`` (read-only), in the delta's parameter order."""
        return MappingProxyType(self._entries)

    @property
    def num_entries(self) -> int:
        """Number of entries in the support."""
        return sum(e.base.numel() for e in self._entries.values())

    def norm(self) -> float:
        """Euclidean norm of theta - theta0 over every parameter (computed in float64)."""
        return math.sqrt(sum(float(e.delta64().square().sum()) for e in self._entries.values()))

    def __repr__(self) -> str:
        return (
            f"SparseDelta(parameters={len(self._entries)}, num_entries={self.num_entries}, "
            f"method={self.method!r}, base={self.base_fingerprint[:12]}...)"
        )

    def summary(self, max_rows: int | None = 40) -> str:
        """A readable table: entries and size of the change per parameter, then the totals."""
        rows = []
        for name, e in self._entries.items():
            d = e.delta64().abs()
            numel = torch.Size(e.shape).numel()
            peak = float(d.max()) if d.numel() else 0.0
            rows.append((name, numel, e.base.numel(), float(d.mean()) if d.numel() else 0.0, peak))
        rows.sort(key=lambda r: -r[2])
        shown = rows if max_rows is None else rows[:max_rows]
        width = max([len(r[0]) for r in shown] + [9])
        lines = [f"{'parameter':<{width}}  {'entries':>10}  {'of':>12}  {'mean|d|':>10}  max|d|"]
        for name, numel, count, mean, peak in shown:
            lines.append(f"{name:<{width}}  {count:>10,}  {numel:>12,}  {mean:>10.3e}  {peak:.3e}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more parameters")
        lines.append(
            f"{self.num_entries:,} entries in {len(rows)} parameters; method {self.method!r}; "
            f"base fingerprint {self.base_fingerprint[:16]}..."
        )
        return "\n".join(lines)

    def to_dense(self) -> dict[str, Tensor]:
        """``name -> dtheta`` as dense float64 tensors (zeros outside the support)."""
        out = {}
        for name, e in self._entries.items():
            dense = torch.zeros(e.shape, dtype=torch.float64, device=e.base.device).reshape(-1)
            dense[slice(None) if e.index is None else e.index] = e.delta64()
            out[name] = dense.reshape(e.shape)
        return out

    def support(self) -> Mask:
        """The entries this delta covers, as a Mask over its parameters."""
        bits = {}
        for name, e in self._entries.items():
            flat = torch.zeros(e.shape, dtype=torch.bool, device=e.base.device).reshape(-1)
            flat[slice(None) if e.index is None else e.index] = True
            bits[name] = flat.reshape(e.shape)
        return Mask(bits)

    # -- model ----------------------------------------------------------------------------
    def _check_fits(self, params: Mapping[str, Tensor]) -> None:
        missing = [n for n in self._entries if n not in params]
        wrong = [
            f"{n}: delta {e.shape} {e.dtype}, model {tuple(params[n].shape)} {params[n].dtype}"
            for n, e in self._entries.items()
            if n in params and (tuple(params[n].shape) != e.shape or params[n].dtype != e.dtype)
        ]
        if missing or wrong:
            raise ParameterMismatchError(
                f"delta does not fit the model: parameters the model lacks {missing}; "
                f"mismatched {wrong}"
            )

    @staticmethod
    def _write(p: Tensor, index: Tensor | None, values: Tensor) -> None:
        flat = p.data.view(-1) if p.is_contiguous() else None
        if flat is None:
            staged = p.detach().reshape(-1).clone()
            staged[slice(None) if index is None else index.to(p.device)] = values.to(p.device)
            p.data.copy_(staged.view(p.shape))
        else:
            flat[slice(None) if index is None else index.to(p.device)] = values.to(p.device)

    @torch.no_grad()
    def apply_to(
        self, model: nn.Module, scale: float = 1.0, *, check_base: bool = True
    ) -> nn.Module:
        """Turn the base model into the tuned one, in place: theta = theta0 + scale dtheta.

        ``scale=1`` writes the tuned values exactly; other scales compute theta0 + scale dtheta
        in float64 and round once. The model must be the delta's base (fingerprint checked).
        """
        params = dict(model.named_parameters())
        self._check_fits(params)
        if check_base:
            found = base_fingerprint(params)
            if found != self.base_fingerprint:
                raise BaseModelMismatchError(
                    f"this delta was extracted from another base model (fingerprint "
                    f"{self.base_fingerprint[:12]}..., the model has {found[:12]}...); load the "
                    f"right base, or pass check_base=False to apply it anyway"
                )
        for name, e in self._entries.items():
            p = params[name]
            if scale == 1.0:
                values = e.tuned
            else:
                current = _gather(p, e.index).to(torch.float64)
                values = (current + float(scale) * e.delta64().to(p.device)).to(p.dtype)
            self._write(p, e.index, values)
        return model

    @torch.no_grad()
    def revert_from(self, model: nn.Module) -> nn.Module:
        """Turn the tuned model back into the base, in place (exact).

        The model's values on the support must be the tuned ones; otherwise nothing changes
        and :class:`BaseModelMismatchError` says how many entries differ.
        """
        params = dict(model.named_parameters())
        self._check_fits(params)
        differing = []
        for name, e in self._entries.items():
            count = int((_gather(params[name], e.index) != e.tuned.to(params[name].device)).sum())
            if count:
                differing.append(f"{name} ({count} entries)")
        if differing:
            raise BaseModelMismatchError(
                f"the model does not hold this delta's tuned values in {differing}; "
                f"nothing was changed"
            )
        for name, e in self._entries.items():
            self._write(params[name], e.index, e.base)
        return model

    def __add__(self, other: SparseDelta) -> SparseDelta:
        if not isinstance(other, SparseDelta):
            return NotImplemented
        return merge_deltas([self, other])

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a versioned ``.safetensors`` delta file atomically (:mod:`sparsetune.files`)."""
        from .files.delta_file import save_delta

        return save_delta(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        """Read a delta file strictly: every listed tensor present, nothing else."""
        from .files.delta_file import load_delta

        return load_delta(path)


def merge_deltas(
    deltas: Iterable[SparseDelta], *, policy: str = "sum", method: str = "merged"
) -> SparseDelta:
    """Combine deltas over the same base: supports are united, dtheta combined by ``policy``.

    ``"sum"`` adds the changes (task arithmetic), ``"mean"`` averages them over the deltas that
    cover each entry, ``"error"`` refuses deltas whose supports overlap. Combined values are
    computed in float64 and rounded once to the parameter dtype. The merged delta keeps the
    deltas' :attr:`~SparseDelta.info` when they all carry the same, and none otherwise.
    """
    deltas = list(deltas)
    if not deltas:
        raise InvalidArgumentError("merge_deltas needs at least one delta")
    if policy not in MERGE_POLICIES:
        raise InvalidArgumentError(f"policy must be one of {list(MERGE_POLICIES)}, got {policy!r}")
    if len({d.base_fingerprint for d in deltas}) != 1:
        raise BaseModelMismatchError("cannot merge deltas of different base models")
    entries: dict[str, DeltaEntry] = {}
    for name in dict.fromkeys(n for d in deltas for n in d._entries):
        parts = [d._entries[name] for d in deltas if name in d._entries]
        first = parts[0]
        if any(p.shape != first.shape or p.dtype != first.dtype for p in parts):
            raise ParameterMismatchError(f"deltas disagree on the shape or dtype of '{name}'")
        numel = torch.Size(first.shape).numel()
        device = first.base.device
        total = torch.zeros(numel, dtype=torch.float64, device=device)
        base = torch.zeros(numel, dtype=first.dtype, device=device)
        count = torch.zeros(numel, dtype=torch.int64, device=device)
        for p in parts:
            where = slice(None) if p.index is None else p.index
            total[where] += p.delta64()
            base[where] = p.base
            count[where] += 1
        if policy == "error" and bool((count > 1).any()):
            raise InvalidArgumentError(
                f"deltas overlap on {int((count > 1).sum())} entries of '{name}' "
                f"(policy='error'); use policy='sum' or 'mean'"
            )
        if policy == "mean":
            total = total / count.clamp(min=1)
        covered = count > 0
        index = None if bool(covered.all()) else torch.nonzero(covered)[:, 0]
        where = slice(None) if index is None else index
        tuned = (base[where].to(torch.float64) + total[where]).to(first.dtype)
        entries[name] = DeltaEntry(first.shape, index, base[where].clone(), tuned)
    infos = [d.info for d in deltas]
    return SparseDelta(entries, deltas[0].base_fingerprint, method,
                       infos[0] if all(i == infos[0] for i in infos) else None)
