"""Atomic writes: one temporary file in the target's folder, fsync'd, then one rename.

Every file sparsetune writes (masks, deltas, subspaces, reports, plots) goes through
:func:`atomic_write`. The bytes go to ``.{name}.{8 hex}.sparsetune.tmp`` beside the target
(``name`` cut to 200 characters), are fsync'd, and the file is renamed over the target while
still open; the folder is then fsync'd (where the file system allows it). A crash at any moment
leaves the target either as it was or complete. Safetensors files are streamed tensor by tensor
into that one temporary file (:func:`atomic_save_safetensors`): neither a second temporary file
(as ``safetensors.torch.save_file`` makes its own) nor the whole file as bytes in memory (as
``safetensors.torch.save`` builds).

Stale temporary files: a writer holds an exclusive ``flock`` on its temporary file until the
rename; the kernel drops the lock when the process ends, SIGKILL included. Before each write,
the temporary files of the same target that no process holds locked are left by writers that
died, and are removed; those of a live writer (another process or thread) are kept. Without
``fcntl`` (Windows) nothing is removed.

Any ``OSError`` while writing becomes one :class:`FileWriteError` naming the target (not the
temporary file) and the reason; nothing is left behind. :func:`check_writable` finds the usual
causes (a missing permission, a path under a regular file, a directory as the target) before
any expensive work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FileWriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TMP_SUFFIX",
    "FileWriteError",
    "atomic_save_safetensors",
    "atomic_write",
    "check_writable",
]

TMP_SUFFIX = ".sparsetune.tmp"
_TOKEN_HEX = 8
_CHUNK = 64 << 20  # bytes per os.write call

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
# safetensors' own order of dtypes (its Rust enum): the largest first keeps every tensor aligned
_RANK = {name: i for i, name in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
     "F64", "I64", "U64"))}


def check_writable(*paths: str | os.PathLike | None, folder: bool = False) -> None:
    """Raise :class:`FileWriteError` unless every path (None is skipped) can be written.

    A file target must not be a directory or another non-regular file (``/dev/null``); with
    ``folder=True`` the path must be a folder or not exist. Its nearest existing ancestor must
    be a folder this process may create files in. Nothing is created.
    """
    for path in paths:
        if path is not None:
            _check_one(Path(path), folder)


def _check_one(target: Path, folder: bool) -> None:
    try:
        mode = os.stat(target).st_mode
    except OSError:
        mode = None
    if mode is not None:
        if folder and not stat.S_ISDIR(mode):
            raise _error(target, "it exists and is not a directory", errno.ENOTDIR)
        if not folder and stat.S_ISDIR(mode):
            raise _error(target, "it is a directory", errno.EISDIR)
        if not folder and not stat.S_ISREG(mode):
            raise _error(target, "it exists and is not a regular file", errno.EEXIST)
    ancestor = target if folder and mode is not None else target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _error(target, f"{ancestor} is not a directory", errno.ENOTDIR)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise _error(target, f"permission denied: cannot create files in {ancestor}",
                     errno.EACCES)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on the temporary file beside ``path``, then rename it into place.

    ``write`` opens ``tmp`` by name (it exists, empty) and fills it. Returns ``Path(path)``.
    The file gets the permissions ``open()`` would give.
    """
    return _replace(path, lambda fd, tmp: write(tmp))


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str]
) -> Path:
    """Write a safetensors file atomically, streaming each tensor into the temporary file."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _replace(path, lambda fd, tmp: _write_safetensors(fd, flat, dict(metadata)))


def _replace(path: str | os.PathLike, fill: Callable[[int, str], object]) -> Path:
    target = Path(path)
    check_writable(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        fd, tmp = _open_temp(target)
        try:
            fill(fd, tmp)
            os.fsync(fd)
            os.replace(tmp, target)  # still locked: no cleaner can take it meanwhile
            tmp = None
        finally:
            os.close(fd)
        _fsync_folder(target.parent)
    except FileWriteError:
        raise
    except OSError as exc:
        raise _error(target, exc.strerror or str(exc), exc.errno) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def _error(target: Path, reason: str, code: int | None) -> FileWriteError:
    error = FileWriteError(f"cannot write {target}: {reason}")
    error.errno = code
    return error


def _prefix(target: Path) -> str:
    return f".{target.name[:200]}."


def _open_temp(target: Path) -> tuple[int, str]:
    """Create and lock a new temporary file for ``target``: (descriptor, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = str(target.parent / f"{_prefix(target)}{secrets.token_hex(_TOKEN_HEX // 2)}"
                                  f"{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)  # 0666 less the umask, as open() gives
        except FileExistsError:
            continue
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):  # no locks on this file system: no cleaner
                    fcntl.flock(fd, fcntl.LOCK_EX)
            # a cleaner may have taken it between open and lock: then start again
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)


def _is_temp_of(name: str, target: Path) -> bool:
    prefix = _prefix(target)
    return (name.startswith(prefix) and name.endswith(TMP_SUFFIX)
            and len(name) == len(prefix) + _TOKEN_HEX + len(TMP_SUFFIX))


def _remove_stale(target: Path) -> None:
    """Remove the temporary files of ``target`` that no live writer holds locked."""
    if fcntl is None:
        return
    try:
        names = [e.name for e in os.scandir(target.parent) if _is_temp_of(e.name, target)]
    except OSError:
        return
    for name in names:
        path = target.parent / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer: OSError
            here = os.fstat(fd)
            if stat.S_ISREG(here.st_mode) and os.path.samestat(here, os.lstat(path)):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some file systems refuse fsync on a folder (then skip it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_safetensors(fd: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format, written to ``fd`` one tensor at a time.

    An 8-byte little-endian header length, the JSON header (``__metadata__`` and, per tensor,
    dtype, shape and byte offsets), padded with spaces to 8 bytes, then the tensors' bytes in
    safetensors' own order (largest dtype first, then by name): the same bytes as
    ``safetensors.torch.save`` but for the order of the header's JSON keys.
    """
    if sys.byteorder != "little" or any(t.dtype not in _DTYPES for t in tensors.values()):
        from safetensors.torch import save  # the whole file in memory, byte-swapped as needed

        _write_all(fd, memoryview(save(tensors, metadata=metadata)))
        return
    if "__metadata__" in tensors or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors metadata must map str to str, and no tensor may be named "
                         "'__metadata__'")
    order = sorted(tensors, key=lambda k: (-_RANK[_DTYPES[tensors[k].dtype]], k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    _write_all(fd, memoryview(struct.pack("<Q", len(text)) + text))
    for name in order:
        data = tensors[name].reshape(-1).view(torch.uint8)
        _write_all(fd, memoryview(data.numpy()))


def _write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B")
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]
