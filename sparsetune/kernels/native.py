"""A CPU kernel in C for a sparse delta's product: out (N, a) += x M^T, read row-major.

M: (a, b) with k entries in CSR (``crow`` (a + 1,), ``cols`` and ``values`` (k,)), x: (N, b)
and out: (N, a) row-major (unit last stride, any row stride). For each block of 8 tokens and
each row r of M, the kernel sums v_j x[n, c_j] over r's entries in CSR order into 8 registers
and adds them to out[n, r] (float32 sums for float32 operands, float64 for float64): k N
multiply-adds and no transposed copy of x or out, where torch's CPU routes (MKL's CSR product
into a transposed output, or embedding bags over x^T) pay more for the transposes than for
the products (``benchmarks/delta_products.py``: 2-4x faster than MKL's product at
k / (a + b) <= 2, N = 1024).
Tokens are split across ``torch.get_num_threads()`` OpenMP threads by blocks (one thread in a
process forked after the kernel was loaded); each output entry is summed by one thread in one
order, so results do not depend on the thread count.

The C source below is compiled on first use by the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) with ``-O3 -march=native -fopenmp`` (either dropped where the compiler
refuses it) into ``$SPARSETUNE_CACHE/native`` (default ``~/.cache/sparsetune/native``), named
by a hash of the source, flags, compiler and CPU, written to a temporary file in that folder
and renamed (stale temporary files are removed). Without a compiler or a writable folder, or
with ``SPARSETUNE_NATIVE=0``, :func:`native_available` is False
(:func:`native_unavailable_reason` says why) and callers take the torch twin
(:func:`~sparsetune.kernels.spmm_add_torch`) or MKL's product. Indices are checked in C before
any write: a bad CSR raises ValueError and leaves out untouched.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["native_available", "native_spmm_add_", "native_unavailable_reason"]

#: Tokens per block of the kernel (the registers summed per row of M).
BLOCK_TOKENS = 8

_SOURCE = r"""
#include <stdint.h>
#define RB @BLOCK@

/* 0 if crow (a + 1) is a CSR row pointer over k entries with every column in [0, b). */
#define CHECK(NAME, I) \
int NAME(int64_t a, int64_t b, int64_t k, const I* crow, const I* col) { \
  if (crow[0] != 0 || crow[a] != k) return 1; \
  for (int64_t i = 0; i < a; ++i) if (crow[i + 1] < crow[i]) return 2; \
  for (int64_t j = 0; j < k; ++j) if (col[j] < 0 || col[j] >= b) return 3; \
  return 0; \
}

/* out[n, r] += sum_{j in row r} v[j] x[n, col[j]] for n < N, r < a. */
#define SPMM(NAME, T, I) \
void NAME(int64_t n, int64_t a, const T* x, int64_t ldx, T* out, int64_t ldo, \
          const I* crow, const I* col, const T* v, int nthreads) { \
  int64_t nb = (n + RB - 1) / RB; \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)") \
  for (int64_t blk = 0; blk < nb; ++blk) { \
    int64_t r0 = blk * RB; \
    if (r0 + RB <= n) { \
      const T* x0 = x + r0 * ldx; \
      for (int64_t i = 0; i < a; ++i) { \
        I s0 = crow[i], s1 = crow[i + 1]; \
        if (s0 == s1) continue; \
        T acc[RB] = {0}; \
        for (I j = s0; j < s1; ++j) { \
          T w = v[j]; const T* xc = x0 + col[j]; \
          for (int t = 0; t < RB; ++t) acc[t] += w * xc[t * ldx]; \
        } \
        T* o = out + r0 * ldo + i; \
        for (int t = 0; t < RB; ++t) o[t * ldo] += acc[t]; \
      } \
    } else { \
      for (int64_t r = r0; r < n; ++r) { \
        const T* xr = x + r * ldx; T* o = out + r * ldo; \
        for (int64_t i = 0; i < a; ++i) { \
          I s0 = crow[i], s1 = crow[i + 1]; \
          if (s0 == s1) continue; \
          T acc = 0; \
          for (I j = s0; j < s1; ++j) acc += v[j] * xr[col[j]]; \
          o[i] += acc; \
        } \
      } \
    } \
  } \
}

CHECK(st_check_i64, int64_t)
CHECK(st_check_i32, int32_t)
SPMM(st_spmm_f32_i64, float, int64_t)
SPMM(st_spmm_f32_i32, float, int32_t)
SPMM(st_spmm_f64_i64, double, int64_t)
SPMM(st_spmm_f64_i32, double, int32_t)
""".replace("@BLOCK@", str(BLOCK_TOKENS))

_FLAGS = ("-O3", "-shared", "-fPIC")
#: Optional flags, dropped in this order where the compiler refuses them.
_OPTIONAL = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_INDEX = {torch.int64: "i64", torch.int32: "i32"}
_STALE_SECONDS = 3600.0

_lock = threading.Lock()
# "lib" and "pid": the loaded library and the process that loaded it; or "reason": why none
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("SPARSETUNE_CACHE")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsetune" / "native"


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC")
    if cc:
        return cc.split()
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _clean_stale(folder: Path) -> None:
    """Remove temporary files of compiles that never finished (older than an hour)."""
    now = time.time()
    for p in folder.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_SECONDS:
                p.unlink()
        except OSError:
            pass


def _compile(cc: list[str], target: Path) -> str | None:
    """Compile _SOURCE into target (temporary file in its folder, fsync, rename); None, or
    why not (the compiler's complaint, an unwritable folder)."""
    src = out = ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(target.parent)
        src_fd, src = tempfile.mkstemp(prefix=".tmp-", suffix=".c", dir=target.parent)
        out_fd, out = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=target.parent)
        os.close(out_fd)
        with os.fdopen(src_fd, "w") as f:
            f.write(_SOURCE)
        error = ""
        for optional in _OPTIONAL:  # -march=native and OpenMP where the compiler has them
            run = subprocess.run([*cc, *_FLAGS, *optional, src, "-o", out],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                with open(out, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(out, target)
                return None
            lines = (run.stderr or run.stdout).strip().splitlines()
            error = lines[-1] if lines else f"exit status {run.returncode}"
        return f"{' '.join(cc)} failed: {error}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not compile into {target.parent}: {exc}"
    finally:
        for p in (src, out):
            if p and os.path.exists(p):
                os.unlink(p)


def _target() -> tuple[list[str], Path] | str:
    """(compiler, path of the cached library for this source, compiler and CPU), or why
    there is none."""
    if os.environ.get("SPARSETUNE_NATIVE", "1") == "0":
        return "disabled by SPARSETUNE_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return "no C compiler found ($CC, cc, gcc or clang)"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(cc)} could not run: {exc}"
    key = hashlib.sha256("\0".join([_SOURCE, repr((_FLAGS, _OPTIONAL)), " ".join(cc), version,
                                    platform.machine(), _cpu_id()]).encode()).hexdigest()
    try:
        folder = _cache_dir()
    except RuntimeError as exc:  # no home folder and no $SPARSETUNE_CACHE
        return f"no cache folder: {exc}; set SPARSETUNE_CACHE"
    return cc, folder / f"spmm-{key[:20]}.so"


def _load() -> ctypes.CDLL | None:
    """The compiled library (compiled on first use, cached on disk), or None (reason kept)."""
    with _lock:
        if "lib" in _state or "reason" in _state:
            return _state.get("lib")  # type: ignore[return-value]
        found = _target()
        if isinstance(found, str):
            _state["reason"] = found
            return None
        cc, target = found
        lib = None
        for attempt in range(2):
            if attempt or not target.exists():
                reason = _compile(cc, target)
                if reason is not None:
                    _state["reason"] = reason
                    return None
            try:
                lib = ctypes.CDLL(str(target))
                break
            except OSError as exc:  # a damaged cache file: compile it again, once
                _state["reason"] = f"could not load {target}: {exc}"
                target.unlink(missing_ok=True)
        if lib is None:
            return None
        _state.pop("reason", None)
        for name in ("st_check_i64", "st_check_i32"):
            getattr(lib, name).restype = ctypes.c_int
        for name in ("st_spmm_f32_i64", "st_spmm_f32_i32", "st_spmm_f64_i64",
                     "st_spmm_f64_i32"):
            getattr(lib, name).restype = None
        _state["lib"], _state["pid"] = lib, os.getpid()
        return lib


def native_available() -> bool:
    """Whether :func:`native_spmm_add_` can run (compiling the kernel on first call)."""
    return _load() is not None


def native_unavailable_reason() -> str | None:
    """Why :func:`native_available` is False (None where it is True)."""
    _load()
    return _state.get("reason")  # type: ignore[return-value]


def _threads() -> int:
    """torch's thread count; 1 in a process forked after the library was loaded (GNU OpenMP's
    thread pool does not survive a fork, so a forked child never starts one)."""
    return max(1, torch.get_num_threads()) if _state.get("pid") == os.getpid() else 1


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _overlap(p: Tensor, q: Tensor) -> bool:
    """Whether the memory spans of two strided tensors intersect (a conservative test)."""
    def span(t: Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return start, start + (extent + 1) * t.element_size()
    if p.numel() == 0 or q.numel() == 0:
        return False
    (p0, p1), (q0, q1) = span(p), span(q)
    return p0 < q1 and q0 < p1


def native_spmm_add_(out: Tensor, x: Tensor, crow: Tensor, cols: Tensor, values: Tensor,
                     *, check: bool = True) -> Tensor:
    """out += x @ M^T in place and returned, for out: (N, a) and x: (N, b) CPU tensors of one
    float dtype (float32 or float64) with unit last stride, M: (a, b) in CSR (crow (a + 1,),
    cols (k,), one integer dtype, int32 or int64; values (k,) in out's dtype).

    ``check``: validate the CSR arrays in C first (O(a + k)); only a caller that built them
    (:class:`~sparsetune.modules.CsrLayout`) may pass False. Raises RuntimeError where the
    kernel is not available (:func:`native_unavailable_reason`).
    """
    if out.dim() != 2 or x.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"native_spmm_add_: expected out (N, a) and x (N, b), got "
                         f"{tuple(out.shape)} and {tuple(x.shape)}")
    a, b = out.shape[1], x.shape[1]
    if crow.dim() != 1 or crow.numel() != a + 1 or cols.dim() != 1 or cols.shape != values.shape:
        raise ValueError(f"native_spmm_add_: expected crow ({a + 1},) and cols, values of one "
                         f"length (k,), got {tuple(crow.shape)}, {tuple(cols.shape)}, "
                         f"{tuple(values.shape)}")
    for name, t in (("out", out), ("x", x), ("crow", crow), ("cols", cols), ("values", values)):
        if t.device.type != "cpu":
            raise ValueError(f"native_spmm_add_: {name} is on {t.device}, expected the CPU")
    if out.dtype not in _DTYPES or x.dtype != out.dtype or values.dtype != out.dtype:
        raise ValueError(f"native_spmm_add_: out, x and values must share float32 or float64, "
                         f"got {out.dtype}, {x.dtype}, {values.dtype}")
    if crow.dtype not in _INDEX or cols.dtype != crow.dtype:
        raise ValueError(f"native_spmm_add_: crow and cols must share int32 or int64, got "
                         f"{crow.dtype}, {cols.dtype}")
    for name, t in (("out", out), ("x", x)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"native_spmm_add_: {name} needs a unit last stride (row-major "
                             f"rows), got strides {t.stride()}")
    if _overlap(out, x):
        raise ValueError("native_spmm_add_: out and x overlap in memory")
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native_spmm_add_: the native kernel is not available: "
                           f"{native_unavailable_reason()}")
    crow, cols, values = crow.contiguous(), cols.contiguous(), values.contiguous()
    index = _INDEX[crow.dtype]
    if check:
        code = getattr(lib, f"st_check_{index}")(
            ctypes.c_int64(a), ctypes.c_int64(b), ctypes.c_int64(cols.numel()), _ptr(crow),
            _ptr(cols))
        if code:
            what = {1: f"crow must start at 0 and end at k = {cols.numel()}",
                    2: "crow must not decrease", 3: f"cols must lie in [0, {b})"}[code]
            raise ValueError(f"native_spmm_add_: bad CSR: {what}")
    if out.numel() == 0 or values.numel() == 0:
        return out
    getattr(lib, f"st_spmm_{_DTYPES[out.dtype]}_{index}")(
        ctypes.c_int64(out.shape[0]), ctypes.c_int64(a), _ptr(x), ctypes.c_int64(x.stride(0)),
        _ptr(out), ctypes.c_int64(out.stride(0)), _ptr(crow), _ptr(cols), _ptr(values),
        ctypes.c_int(_threads()))
    return out
