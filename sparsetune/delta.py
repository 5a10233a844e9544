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

Buffers (model state that is not a parameter, e.g. BatchNorm's running statistics and batch
counter) change during training too, so ``apply_to(base)`` can only rebuild the tuned model if
the delta records them. ``extract`` compares every buffer the model saves (those in its
``state_dict()``; non-persistent buffers are skipped) with ``base_state_dict`` bit for bit and
keeps each changed one densely, base and tuned values (:attr:`SparseDelta.buffers`). A buffer
``base_state_dict`` lacks (a parameters-only dict) cannot be compared: ``strict=True`` refuses,
``strict=False`` leaves it out. Buffers behave like fully selected parameters: ``apply_to``
writes them (``scale`` applies to them as to parameters; integer buffers are rounded to the
nearest integer), ``revert_from`` restores them, merges combine them by the same policy. They
are not part of the base fingerprint, the support or the norm.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import reject_sharded, unwrap_compiled
from ._delta_parts import (
    BaseModelMismatchError,
    DeltaEntry,
    differing,
    gather,
    merged_entry,
    rounded,
    saved_buffers,
)
from ._merge_policies import SPARSE_POLICIES, Overlap, overlap, sparse_merged_entries
from .errors import InvalidArgumentError, ParameterMismatchError
from .mask import Mask

__all__ = ["MERGE_POLICIES", "BaseModelMismatchError", "DeltaEntry", "Overlap", "SparseDelta",
           "base_fingerprint", "merge_deltas", "overlap_report", "register_attach",
           "saved_buffers"]

MERGE_POLICIES = ("sum", "mean", "error", *SPARSE_POLICIES)
#: Default ``density`` of the sparse policies: the papers' (TIES keeps the top 20%, DARE drops 90%).
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.1}

# The function behind SparseDelta.attach_to. It lives in sparsetune.modules, which sits above
# this module (it builds SparseDeltas), so it registers itself here when imported.
_ATTACH: list[Callable[..., Any]] = []


def register_attach(fn: Callable[..., Any]) -> None:
    """Install ``fn(model, delta, name, check_base) -> DeltaHandle`` as the implementation of
    :meth:`SparseDelta.attach_to` (done by :mod:`sparsetune.modules` on import)."""
    _ATTACH[:] = [fn]


def base_fingerprint(params: Mapping[str, Tensor]) -> str:
    """SHA-256 of the names, shapes, dtypes and exact bytes of ``params`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SparseDelta:
    """theta - theta0 on the support of a mask, with the base model's fingerprint."""

    def __init__(
        self,
        entries: Mapping[str, DeltaEntry],
        base_fingerprint: str,
        method: str = "unknown",
        info: Mapping[str, str] | None = None,
        buffers: Mapping[str, DeltaEntry] | None = None,
    ) -> None:
        self._entries = dict(entries)
        self._buffers = dict(buffers or {})
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
        parameters that moved outside the mask. Buffers that differ from ``base_state_dict``
        (pass the base's ``state_dict()``) are recorded densely; with ``strict=True`` a buffer
        it lacks is an error, with ``strict=False`` it is left out (module docstring). A model
        sharded with FSDP2 is refused: ``sparsetune.integrations.fsdp.extract_delta`` gathers
        its delta on one rank.
        """
        model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
        reject_sharded(model, "SparseDelta.extract",
                       "call sparsetune.integrations.fsdp.extract_delta (or save_delta) on "
                       "every rank: it gathers the selected entries on one rank")
        params = dict(model.named_parameters())
        buffers = saved_buffers(model)
        mask.check(model)
        missing = [n for n in params if n not in base_state_dict]
        shapes = [
            f"{n}: base {tuple(base_state_dict[n].shape)} {base_state_dict[n].dtype}, "
            f"model {tuple(p.shape)} {p.dtype}"
            for n, p in {**params, **buffers}.items()
            if n in base_state_dict
            and (base_state_dict[n].shape != p.shape or base_state_dict[n].dtype != p.dtype)
        ]
        if missing or shapes:
            raise ParameterMismatchError(
                f"base_state_dict does not match the model: missing {missing}; "
                f"mismatched {shapes}"
            )
        absent = [n for n in buffers if n not in base_state_dict]
        if absent and strict:
            raise ParameterMismatchError(
                f"base_state_dict lacks the model's buffers {absent}, so the delta cannot tell "
                f"whether they changed (BatchNorm statistics do in training): pass the base "
                f"model's state_dict() (parameters and buffers), or strict=False to leave them out"
            )
        changed = {}
        for name, b in buffers.items():
            if name in base_state_dict and differing(b, base_state_dict[name]):
                old = base_state_dict[name].detach().to(b.device)
                changed[name] = DeltaEntry(tuple(b.shape), None, gather(old, None),
                                           gather(b, None))
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
                tuple(new.shape), index, gather(old, index), gather(new, index)
            )
        if moved_outside:
            raise BaseModelMismatchError(
                f"the model differs from the base outside the mask in {moved_outside}; the delta "
                f"would not reproduce it (pass strict=False to keep only the masked change)"
            )
        return cls(entries, base_fingerprint(base), method, info, changed)

    # -- counts ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    @property
    def entries(self) -> Mapping[str, DeltaEntry]:
        """``name -> DeltaEntry`` (read-only), in the delta's parameter order."""
        return MappingProxyType(self._entries)

    @property
    def buffers(self) -> Mapping[str, DeltaEntry]:
        """``name -> DeltaEntry`` (read-only, dense) of the buffers that changed."""
        return MappingProxyType(self._buffers)

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
        if self._buffers:
            lines.append(f"{len(self._buffers)} buffers recorded densely: {list(self._buffers)}")
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
    def _check_fits(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
        missing = [n for n in self._entries if n not in params]
        missing_buffers = [n for n in self._buffers if n not in buffers]
        wrong = [
            f"{n}: delta {e.shape} {e.dtype}, model {tuple(t[n].shape)} {t[n].dtype}"
            for entries, t in ((self._entries, params), (self._buffers, buffers))
            for n, e in entries.items()
            if n in t and (tuple(t[n].shape) != e.shape or t[n].dtype != e.dtype)
        ]
        if missing or missing_buffers or wrong:
            raise ParameterMismatchError(
                f"delta does not fit the model: parameters the model lacks {missing}; "
                f"buffers the model lacks {missing_buffers}; mismatched {wrong}"
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
        Recorded buffers are written too, by the same rule.
        """
        model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
        params, buffers = dict(model.named_parameters()), saved_buffers(model)
        self._check_fits(params, buffers)
        if check_base:
            found = base_fingerprint(params)
            if found != self.base_fingerprint:
                raise BaseModelMismatchError(
                    f"this delta was extracted from another base model (fingerprint "
                    f"{self.base_fingerprint[:12]}..., the model has {found[:12]}...); load the "
                    f"right base, or pass check_base=False to apply it anyway"
                )

        def value(t: Tensor, e: DeltaEntry, name: str) -> Tensor:
            if scale == 1.0:
                return e.tuned
            current = gather(t, e.index).to(torch.float64)
            return rounded(current + float(scale) * e.delta64().to(t.device), t.dtype, name)

        # buffers first, before anything is written: one that cannot be scaled changes nothing
        staged = [(buffers[n], value(buffers[n], e, n)) for n, e in self._buffers.items()]
        for name, e in self._entries.items():
            self._write(params[name], e.index, value(params[name], e, name))
        for b, values in staged:
            self._write(b, None, values)
        return model

    @torch.no_grad()
    def revert_from(self, model: nn.Module) -> nn.Module:
        """Turn the tuned model back into the base, in place (exact).

        The model's values on the support must be the tuned ones; otherwise nothing changes
        and :class:`BaseModelMismatchError` says how many entries differ.
        """
        model = unwrap_compiled(model)  # torch.compile: the module it wraps, plain names
        params, buffers = dict(model.named_parameters()), saved_buffers(model)
        self._check_fits(params, buffers)
        wrong = []
        for name, e in self._entries.items():
            count = int((gather(params[name], e.index) != e.tuned.to(params[name].device)).sum())
            if count:
                wrong.append(f"{name} ({count} entries)")
        for name, e in self._buffers.items():
            count = differing(gather(buffers[name], None), e.tuned)
            if count:
                wrong.append(f"{name} (buffer, {count} entries)")
        if wrong:
            raise BaseModelMismatchError(
                f"the model does not hold this delta's tuned values in {wrong}; "
                f"nothing was changed"
            )
        for name, e in self._entries.items():
            self._write(params[name], e.index, e.base)
        for name, e in self._buffers.items():
            self._write(buffers[name], None, e.base)
        return model

    def attach_to(self, model: nn.Module, name: str = "default", *, check_base: bool = True
                  ) -> Any:
        """Load this delta as a module over the frozen base instead of writing the base:
        :func:`sparsetune.attach` on the delta's support, its values set to dtheta (rounded to
        float32; float64 over a float64 base). Returns the
        :class:`~sparsetune.modules.DeltaHandle`; ``handle.to_delta()`` gives this delta back.
        Buffers the delta records are not attached (``apply_to`` writes them)."""
        if not _ATTACH:
            raise InvalidArgumentError("attach_to needs sparsetune.modules: import sparsetune")
        return _ATTACH[0](model, self, name, check_base)

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
    deltas: Iterable[SparseDelta], *, policy: str = "sum", method: str = "merged",
    density: float | None = None, seed: int = 0,
) -> SparseDelta:
    """Combine deltas over the same base: supports are united, dtheta combined by ``policy``.

    ``"sum"`` adds the changes (task arithmetic), ``"mean"`` averages them over the deltas that
    cover each entry, ``"error"`` refuses deltas whose supports overlap; ``"ties"`` trims each
    delta to its top ``density`` fraction by |dtheta|, elects a sign per entry and averages the
    agreeing values, ``"dare"`` drops entries with probability 1 - ``density`` (seeded by
    ``seed``) and rescales the rest by 1 / ``density`` before adding (:mod:`._merge_policies`;
    ``density`` defaults to :data:`DEFAULT_DENSITY`; deltas that record buffers are refused:
    trimming or dropping a buffer's change has no meaning). Combined values are
    computed in float64 and rounded once to the parameter dtype. Recorded buffers are combined
    the same way, as fully covered tensors (``"error"`` refuses two deltas that both change
    one; integer buffers are rounded to the nearest integer); deltas that record different base
    values for a buffer are refused. The merged delta keeps the deltas'
    :attr:`~SparseDelta.info` when they all carry the same, and none otherwise.
    """
    deltas = list(deltas)
    if not deltas:
        raise InvalidArgumentError("merge_deltas needs at least one delta")
    if policy not in MERGE_POLICIES:
        raise InvalidArgumentError(f"policy must be one of {list(MERGE_POLICIES)}, got {policy!r}")
    if len({d.base_fingerprint for d in deltas}) != 1:
        raise BaseModelMismatchError("cannot merge deltas of different base models")
    infos = [d.info for d in deltas]
    info = infos[0] if all(i == infos[0] for i in infos) else None
    if policy in SPARSE_POLICIES:
        if any(d._buffers for d in deltas):
            raise InvalidArgumentError(f"policy={policy!r} merges parameters only; these "
                                       f"deltas record buffers: use 'sum' or 'mean'")
        density = DEFAULT_DENSITY[policy] if density is None else float(density)
        entries = sparse_merged_entries([d._entries for d in deltas], policy, density, seed)
        return SparseDelta(entries, deltas[0].base_fingerprint, method, info)
    merged = []
    for tables in ([d._entries for d in deltas], [d._buffers for d in deltas]):
        merged.append({
            name: merged_entry(name, [t[name] for t in tables if name in t], policy)
            for name in dict.fromkeys(n for t in tables for n in t)
        })
    return SparseDelta(merged[0], deltas[0].base_fingerprint, method, info, merged[1])


def overlap_report(deltas: Iterable[SparseDelta]) -> dict[tuple[int, int], Overlap]:
    """For every pair i < j of ``deltas``: the entries they share and how many of those change
    in opposite directions (:class:`Overlap`; what ``"ties"`` resolves, ``"sum"`` adds)."""
    deltas = list(deltas)
    return {(i, j): overlap(list(deltas[i].entries.items()), list(deltas[j].entries.items()))
            for i in range(len(deltas)) for j in range(i + 1, len(deltas))}
