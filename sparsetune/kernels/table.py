"""Gather and scatter the selected entries of many tensors in one launch: a pointer table.

A :class:`GatherTable` is built once from T tensors' sizes and their selected local flat
indices (or None: every entry, in order). It lays the k selected entries end to end, tensor
after tensor (tensor t owns ``flat[table.slices[t]]``), and precomputes on the device:

* ``index``: the local indices of the indexed tensors, concatenated (int32 when every tensor
  has fewer than 2**31 entries, else int64); a tensor with every entry selected has none;
* ``blocks``: (B, 5) int64, one row per block of at most :data:`BLOCK` entries of one tensor:
  tensor, start and end in the flat buffer, base (the first local index of an every-entry
  tensor's block, else the block's first position in ``index``), 1 for every-entry else 0.

:meth:`GatherTable.gather` (out[j] = tensors[t(j)].view(-1)[idx(j)]) and
:meth:`GatherTable.scatter` (the reverse) then cost one kernel launch (:mod:`._table_triton`)
whatever T, given an int64 device tensor of the tensors' ``data_ptr()`` values, built at each
call from the tensors given (gradients are new tensors after each backward; on CUDA the last
few address lists are kept on the device, so a repeated one costs no host-to-device copy).
The tensors share one dtype (bfloat16, float16, float32) and device and are contiguous; the
flat buffer may have another dtype: cast in registers where exact (e.g. bf16 gradients
gathered into float32), by one torch cast otherwise (round to nearest even everywhere).
Entries of different tensors must not share memory (scatter order is unspecified).

The torch twin (``backend="torch"``, and wherever :func:`kernel_available` says no) loops over
the tensors (a copy, ``index_select`` or ``index_put_`` each: O(T) launches) and also takes
float64. Under ``TRITON_INTERPRET=1`` the kernel runs for CPU tensors only (the interpreter
copies CUDA arguments to the host, but not the tensors the table points to).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from .sddmm import first_launch_guarded, kernel_available

__all__ = ["BLOCK", "GatherTable"]

#: Entries one program of the kernel moves (a block never straddles two tensors).
BLOCK = 1024

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TWIN_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_INT32_LIMIT = 2**31 - 1
_CACHED_ADDRESS_LISTS = 4


def _kernel_runs(device_type: str, *dtypes: torch.dtype) -> bool:
    """The kernel can run for these dtypes on ``device_type``. Under the interpreter only on
    CPU: it copies CUDA arguments to the host, but not the tensors the table points to."""
    if device_type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return all(kernel_available(device_type, dtype) for dtype in dtypes)


def _exact_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """The kernel casts in registers only where no rounding happens (the same dtype, or 16-bit
    to float32): the interpreter truncates float32 to bfloat16, where torch and compiled Triton
    round to nearest even, so rounding casts are left to torch."""
    return source == target or target == torch.float32


def _bump_versions(tensors: Sequence[Tensor]) -> None:
    """Tell autograd the tensors were written in place (the kernel writes behind its back)."""
    from torch.autograd.graph import increment_version

    try:
        increment_version(list(tensors))
    except TypeError:  # torch releases whose increment_version takes one tensor
        for tensor in tensors:
            increment_version(tensor)


class GatherTable:
    """The selected entries of T tensors, laid end to end: one launch gathers or scatters all.

    ``numels``: each tensor's number of entries; ``indices``: each tensor's selected local flat
    indices (a 1-D integer tensor, distinct, in the order wanted; empty: none) or None (every
    entry, in order); ``device``: where the tensors live. See the module docstring.
    """

    def __init__(
        self,
        numels: Sequence[int],
        indices: Sequence[Tensor | None],
        device: torch.device | str,
        *,
        block: int = BLOCK,
    ) -> None:
        if len(numels) != len(indices):
            raise ValueError(f"GatherTable: {len(numels)} numels but {len(indices)} indices")
        if block < 1 or block & (block - 1):
            raise ValueError(f"GatherTable: block must be a power of two, got {block}")
        self.numels = tuple(int(n) for n in numels)
        if any(n < 0 for n in self.numels):
            raise ValueError(f"GatherTable: negative numel in {self.numels}")
        self.block = block
        dtype = torch.int32 if max(self.numels, default=0) <= _INT32_LIMIT else torch.int64
        counts, where, parts, bounds = [], [], [], []
        position = 0
        for t, (numel, idx) in enumerate(zip(self.numels, indices)):
            if idx is None:
                counts.append(numel)
                where.append(0)
                continue
            if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or (
                idx.dtype == torch.bool
            ):
                raise ValueError(f"GatherTable: indices[{t}] must be a 1-D integer tensor, got "
                                 f"{idx.dtype} of shape {tuple(idx.shape)}")
            parts.append(idx.to(device=device, dtype=dtype))
            counts.append(idx.numel())
            where.append(position)
            bounds.append(numel)
            position += idx.numel()
        self.index = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        self.device = self.index.device  # "cuda" -> "cuda:0"
        if position:
            limit = torch.tensor(bounds, device=self.device).repeat_interleave(
                torch.tensor([p.numel() for p in parts], device=self.device))
            if bool(((self.index < 0) | (self.index >= limit)).any()):
                raise ValueError("GatherTable: an index lies outside its tensor")
        self.counts = tuple(counts)
        self.every = tuple(idx is None for idx in indices)
        self.slices, start = [], 0
        for count in counts:
            self.slices.append(slice(start, start + count))
            start += count
        self.k = start
        self._local = [
            None if every else self.index[w:w + c]
            for every, w, c in zip(self.every, where, counts)
        ]
        # the kernel needs an address to offset even when nothing is indexed
        self._index_arg = self.index if position else torch.zeros(1, dtype=dtype, device=device)
        self.blocks = self._block_rows(where).to(self.device)
        self._addresses: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()

    def _block_rows(self, where: list[int]) -> Tensor:
        """The (B, 5) int64 block table (see the module docstring), built on the host."""
        i64 = torch.int64
        counts = torch.tensor(self.counts, dtype=i64)
        blocks = (counts + self.block - 1) // self.block
        tensor = torch.repeat_interleave(torch.arange(len(self.counts), dtype=i64), blocks)
        first = torch.cumsum(blocks, 0) - blocks
        offset = (torch.arange(tensor.numel(), dtype=i64) - first[tensor]) * self.block
        starts = torch.cumsum(counts, 0) - counts
        start = starts[tensor] + offset
        end = torch.minimum(start + self.block, (starts + counts)[tensor])
        every = torch.tensor(self.every, dtype=torch.bool)[tensor]
        base = torch.where(every, offset, torch.tensor(where, dtype=i64)[tensor] + offset)
        return torch.stack([tensor, start, end, base, every.to(i64)], dim=1).contiguous()

    def __len__(self) -> int:
        return len(self.numels)

    # -- checks -----------------------------------------------------------------------------
    def _check_tensors(self, tensors: Sequence[Tensor]) -> torch.dtype:
        """Raise unless ``tensors`` match the table: their common dtype."""
        if len(tensors) != len(self.numels):
            raise ValueError(f"GatherTable: built for {len(self.numels)} tensors, got "
                             f"{len(tensors)}")
        dtype = tensors[0].dtype if tensors else torch.float32
        for t, (tensor, numel) in enumerate(zip(tensors, self.numels)):
            if tensor.layout != torch.strided:
                raise ValueError(f"GatherTable: tensor {t} is {tensor.layout}, not strided")
            if tensor.numel() != numel:
                raise ValueError(f"GatherTable: tensor {t} has {tensor.numel()} entries, the "
                                 f"table was built for {numel}")
            if tensor.dtype != dtype:
                raise ValueError(f"GatherTable: tensors of mixed dtypes ({dtype} and "
                                 f"{tensor.dtype} at {t})")
            if tensor.device != self.device:
                raise ValueError(f"GatherTable: tensor {t} is on {tensor.device}, the table on "
                                 f"{self.device}")
            if not tensor.is_contiguous():
                raise ValueError(f"GatherTable: tensor {t} is not contiguous")
        if dtype not in _TWIN_DTYPES:
            raise ValueError(f"GatherTable: tensors must be float16, bfloat16, float32 or "
                             f"float64, got {dtype}")
        return dtype

    def _check_flat(self, flat: Tensor, name: str) -> None:
        if flat.dim() != 1 or flat.numel() != self.k or not flat.is_contiguous():
            raise ValueError(f"GatherTable: {name} must be 1-D, contiguous, of {self.k} "
                             f"entries, got shape {tuple(flat.shape)}")
        if flat.device != self.device:
            raise ValueError(f"GatherTable: {name} is on {flat.device}, the table on "
                             f"{self.device}")
        if flat.dtype not in _TWIN_DTYPES:
            raise ValueError(f"GatherTable: {name} must be float16, bfloat16, float32 or "
                             f"float64, got {flat.dtype}")

    def _backend(self, backend: str, *dtypes: torch.dtype) -> str:
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"GatherTable: backend must be 'auto', 'triton' or 'torch', got "
                             f"{backend!r}")
        if backend == "auto":
            return "triton" if _kernel_runs(self.device.type, *dtypes) else "torch"
        if backend == "triton":
            if any(dtype not in _KERNEL_DTYPES for dtype in dtypes):
                raise ValueError(f"GatherTable: the kernel takes bfloat16, float16 and float32, "
                                 f"got {list(dtypes)}")
            if self.device.type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
                raise ValueError("GatherTable: the Triton interpreter runs CPU tensors only")
        return backend

    def _pointers(self, tensors: Sequence[Tensor]) -> Tensor:
        """(T,) int64 on the device: the tensors' addresses (cached by value on CUDA)."""
        key = tuple(tensor.data_ptr() for tensor in tensors)
        if self.device.type != "cuda":
            return torch.tensor(key, dtype=torch.int64, device=self.device)
        cached = self._addresses.get(key)
        if cached is None:
            host = torch.tensor(key, dtype=torch.int64).pin_memory()
            cached = host.to(self.device, non_blocking=True)  # the host block is recorded
            self._addresses[key] = cached
            if len(self._addresses) > _CACHED_ADDRESS_LISTS:
                self._addresses.popitem(last=False)
        else:
            self._addresses.move_to_end(key)
        return cached

    # -- gather and scatter -----------------------------------------------------------------
    def gather(
        self, tensors: Sequence[Tensor], out: Tensor | None = None, *, backend: str = "auto"
    ) -> Tensor:
        """out[j] = tensors[t(j)].view(-1)[idx(j)] for the k entries -> ``out`` (k,), in its
        own dtype (a new buffer in the tensors' dtype when None).

        ``backend``: ``"triton"`` (one launch), ``"torch"`` (the twin) or ``"auto"`` (Triton
        where the kernel can run for the tensors' and ``out``'s dtypes, else torch)."""
        dtype = self._check_tensors(tensors)
        if out is None:
            out = torch.empty(self.k, dtype=dtype, device=self.device)
        self._check_flat(out, "out")
        if self._backend(backend, dtype, out.dtype) == "torch":
            return self.gather_torch(tensors, out)
        from ._table_triton import gather_triton  # Triton is imported only here

        def launch() -> Tensor:
            if self.k:
                into = out if _exact_cast(dtype, out.dtype) else torch.empty_like(out,
                                                                                 dtype=dtype)
                gather_triton(self.blocks, self._pointers(tensors), self._index_arg,
                              tensors[0], into, self.block)
                if into is not out:
                    out.copy_(into)  # a rounding cast: torch's, round to nearest even
            return out

        if backend != "auto":
            return launch()
        return first_launch_guarded(f"table_gather[{dtype}->{out.dtype}]", self.device.type, launch,
                                    lambda: self.gather_torch(tensors, out))

    def scatter(
        self, tensors: Sequence[Tensor], values: Tensor, *, backend: str = "auto"
    ) -> None:
        """tensors[t(j)].view(-1)[idx(j)] = values[j] in place; values (k,) of any float dtype,
        cast to the tensors'. ``backend`` as in :meth:`gather`."""
        dtype = self._check_tensors(tensors)
        self._check_flat(values, "values")
        if self._backend(backend, dtype, values.dtype) == "torch":
            self.scatter_torch(tensors, values)
            return
        from ._table_triton import scatter_triton  # Triton is imported only here

        def launch() -> None:
            if self.k:
                cast = values if _exact_cast(values.dtype, dtype) else values.to(dtype)
                scatter_triton(self.blocks, self._pointers(tensors), self._index_arg,
                               tensors[0], cast, self.block)  # (a cast rounds as torch does)
                _bump_versions(tensors)

        if backend != "auto":
            launch()
            return
        first_launch_guarded(f"table_scatter[{values.dtype}->{dtype}]", self.device.type, launch,
                             lambda: self.scatter_torch(tensors, values))

    def gather_torch(self, tensors: Sequence[Tensor], out: Tensor) -> Tensor:
        """The twin of :meth:`gather`: one copy or ``index_select`` per tensor (no checks)."""
        for tensor, local, part in zip(tensors, self._local, self.slices):
            flat = tensor.view(-1)
            if local is None:
                out[part].copy_(flat)
            elif out.dtype == flat.dtype:
                torch.index_select(flat, 0, local, out=out[part])
            else:
                out[part].copy_(flat.index_select(0, local))
        return out

    def scatter_torch(self, tensors: Sequence[Tensor], values: Tensor) -> None:
        """The twin of :meth:`scatter`: one copy or ``index_put_`` per tensor (no checks)."""
        for tensor, local, part in zip(tensors, self._local, self.slices):
            flat, new = tensor.view(-1), values[part]
            if local is None:
                flat.copy_(new)
            elif local.numel():
                flat.index_put_((local,), new.to(flat.dtype))
