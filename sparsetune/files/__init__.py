"""File formats, the last layer: masks, deltas and subspaces as versioned safetensors files.

One parameter-table codec (:mod:`.table`) serves every kind; every write is atomic
(:mod:`.atomic`: one temporary file, fsync, rename; a failed write is one
:class:`FileWriteError` naming the target); reading is strict (exact tensor keys, digests, index
bounds). Nothing below :mod:`sparsetune.delta` imports this package except through the lazy
``save``/``load`` methods of :class:`~sparsetune.Mask` and :class:`~sparsetune.SparseDelta`.
"""

from ..errors import FileFormatError
from .atomic import FileWriteError, atomic_save_safetensors, atomic_write, check_writable
from .delta_file import load_delta, save_delta
from .describe import describe_file
from .mask_file import load_mask, model_fingerprint, save_mask
from .subspace_file import load_subspace, save_subspace
from .table import FORMAT_VERSION, read_metadata

__all__ = [
    "FORMAT_VERSION",
    "FileFormatError",
    "FileWriteError",
    "atomic_save_safetensors",
    "atomic_write",
    "check_writable",
    "describe_file",
    "load_delta",
    "load_mask",
    "load_subspace",
    "model_fingerprint",
    "read_metadata",
    "save_delta",
    "save_mask",
    "save_subspace",
]
