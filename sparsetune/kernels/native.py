"""CPU kernels in C for a sparse delta's product out (N, a) += x M^T and its backward.

:func:`native_spmm_add_` is the product; :func:`native_spmm_backward_` its backward in one
pass over M^T's CSR order (the input gradient g M added in place, and the values' gradient
from the same gathered g, summed per 128-token chunk and then over chunks in order).

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

__all__ = ["native_available", "native_spmm_add_", "native_spmm_backward_",
           "native_unavailable_reason"]

#: Tokens per block of the kernel (the registers summed per row of M).
BLOCK_TOKENS = 8
#: Tokens per partial sum of the values' gradient in the backward kernel (a fixed order).
_CHUNK_TOKENS = 128

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

/* The backward of out += x M^T over A = M^T (p rows, CSR) with g: (N, q), x: (N, p):
   gx[n, i] += sum_{e in row i} v[e] g[n, col[e]]    (skipped where gx is NULL)
   gv[e]     = sum_n g[n, col[e]] x[n, i]            for e in row i
   gv is summed per chunk of CH tokens into partial (chunks x k), then over chunks in order. */
#define CH @CHUNK@
#define BWD_BLOCK(CNT, T, I) \
  for (int64_t i = 0; i < p; ++i) { \
    I s0 = crow[i], s1 = crow[i + 1]; \
    if (s0 == s1) continue; \
    T xv[RB], acc[RB]; \
    for (int t = 0; t < (CNT); ++t) { xv[t] = x0[t * ldx + i]; acc[t] = 0; } \
    for (I e = s0; e < s1; ++e) { \
      const T* gc = g0 + col[e]; T w = v[e], pe = 0; \
      for (int t = 0; t < (CNT); ++t) { T gt = gc[t * ldg]; acc[t] += w * gt; pe += gt * xv[t]; } \
      part[e] += pe; \
    } \
    if (gx) { T* o = gx + r0 * ldgx + i; for (int t = 0; t < (CNT); ++t) o[t * ldgx] += acc[t]; } \
  }
#define BWD(NAME, T, I) \
void NAME(int64_t n, int64_t p, int64_t k, const T* g, int64_t ldg, const T* x, int64_t ldx, \
          T* gx, int64_t ldgx, const I* crow, const I* col, const T* v, T* partial, T* gv, \
          int nthreads) { \
  int64_t nc = (n + CH - 1) / CH; \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)") \
  for (int64_t ch = 0; ch < nc; ++ch) { \
    T* part = partial + ch * k; \
    for (int64_t e = 0; e < k; ++e) part[e] = 0; \
    int64_t end = (ch + 1) * CH < n ? (ch + 1) * CH : n; \
    for (int64_t r0 = ch * CH; r0 < end; r0 += RB) { \
      const T* g0 = g + r0 * ldg; const T* x0 = x + r0 * ldx; \
      int rn = end - r0 < RB ? (int)(end - r0) : RB; \
      if (rn == RB) { BWD_BLOCK(RB, T, I) } else { BWD_BLOCK(rn, T, I) } \
    } \
  } \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)") \
  for (int64_t e = 0; e < k; ++e) { \
    T s = 0; \
    for (int64_t ch = 0; ch < nc; ++ch) s += partial[ch * k + e]; \
    gv[e] = s; \
  } \
}

CHECK(st_check_i64, int64_t)
CHECK(st_check_i32, int32_t)
SPMM(st_spmm_f32_i64, float, int64_t)
SPMM(st_spmm_f32_i32, float, int32_t)
SPMM(st_spmm_f64_i64, double, int64_t)
SPMM(st_spmm_f64_i32, double, int32_t)
BWD(st_bwd_f32_i64, float, int64_t)
BWD(st_bwd_f32_i32, float, int32_t)
BWD(st_bwd_f64_i64, double, int64_t)
BWD(st_bwd_f64_i32, double, int32_t)
""".replace("@BLOCK@", str(BLOCK_TOKENS)).replace("@CHUNK@", str(_CHUNK_TOKENS))

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
        for kind in ("spmm", "bwd"):
            for name in ("f32_i64", "f32_i32", "f64_i64", "f64_i32"):
                getattr(lib, f"st_{kind}_{name}").restype = None
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


def _check(fn: str, dense: dict[str, Tensor], crow: Tensor, cols: Tensor,
           values: Tensor) -> None:
    """The shared argument checks of the kernels (``dense``: name -> 2-D operand)."""
    for name, t in (*dense.items(), ("crow", crow), ("cols", cols), ("values", values)):
        if t.device.type != "cpu":
            raise ValueError(f"{fn}: {name} is on {t.device}, expected the CPU")
    dtypes = [t.dtype for t in (*dense.values(), values)]
    if dtypes[0] not in _DTYPES or len(set(dtypes)) != 1:
        raise ValueError(f"{fn}: {', '.join(dense)} and values must share float32 or float64, "
                         f"got {', '.join(str(d) for d in dtypes)}")
    if crow.dtype not in _INDEX or cols.dtype != crow.dtype:
        raise ValueError(f"{fn}: crow and cols must share int32 or int64, got "
                         f"{crow.dtype}, {cols.dtype}")
    for name, t in dense.items():
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{fn}: {name} needs a unit last stride (row-major rows), got "
                             f"strides {t.stride()}")


def _library(fn: str) -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"{fn}: the native kernel is not available: "
                           f"{native_unavailable_reason()}")
    return lib


def _check_csr(fn: str, lib: ctypes.CDLL, rows: int, width: int, crow: Tensor,
               cols: Tensor) -> None:
    """crow (rows + 1,) a CSR row pointer over cols, every column in [0, width), checked in C."""
    code = getattr(lib, f"st_check_{_INDEX[crow.dtype]}")(
        ctypes.c_int64(rows), ctypes.c_int64(width), ctypes.c_int64(cols.numel()), _ptr(crow),
        _ptr(cols))
    if code:
        what = {1: f"crow must start at 0 and end at k = {cols.numel()}",
                2: "crow must not decrease", 3: f"cols must lie in [0, {width})"}[code]
        raise ValueError(f"{fn}: bad CSR: {what}")


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
    fn = "native_spmm_add_"
    _check(fn, {"out": out, "x": x}, crow, cols, values)
    if _overlap(out, x):
        raise ValueError(f"{fn}: out and x overlap in memory")
    lib = _library(fn)
    crow, cols, values = crow.contiguous(), cols.contiguous(), values.contiguous()
    index = _INDEX[crow.dtype]
    if check:
        _check_csr(fn, lib, a, b, crow, cols)
    if out.numel() == 0 or values.numel() == 0:
        return out
    getattr(lib, f"st_spmm_{_DTYPES[out.dtype]}_{index}")(
        ctypes.c_int64(out.shape[0]), ctypes.c_int64(a), _ptr(x), ctypes.c_int64(x.stride(0)),
        _ptr(out), ctypes.c_int64(out.stride(0)), _ptr(crow), _ptr(cols), _ptr(values),
        ctypes.c_int(_threads()))
    return out


def native_spmm_backward_(grad_x: Tensor | None, g: Tensor, x: Tensor, crow: Tensor,
                          cols: Tensor, values: Tensor, *, check: bool = True) -> Tensor:
    """The backward of a delta's product out = x M^T in one pass, for M: (a, b) given as its
    transpose A = M^T: (b, a) in CSR (crow (b + 1,), cols (k,) in [0, a), values (k,)); g: (N, a)
    the output gradient and x: (N, b) the input, row-major CPU tensors of one float dtype.

    Adds the input gradient g M into ``grad_x`` ((N, b), in place; None skips it) and returns
    the values' gradient (k,), in A's CSR order: grad[e] = sum_n g[n, cols[e]] x[n, i] for
    entry e in row i. The sums over tokens are taken per chunk of 128 tokens, then over chunks
    in order, so they do not depend on the thread count. ``check`` as for
    :func:`native_spmm_add_`.
    """
    fn = "native_spmm_backward_"
    if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: expected g (N, a) and x (N, b), got {tuple(g.shape)} and "
                         f"{tuple(x.shape)}")
    b, a = x.shape[1], g.shape[1]
    if grad_x is not None and grad_x.shape != x.shape:
        raise ValueError(f"{fn}: expected grad_x of x's shape {tuple(x.shape)}, got "
                         f"{tuple(grad_x.shape)}")
    if crow.dim() != 1 or crow.numel() != b + 1 or cols.dim() != 1 or cols.shape != values.shape:
        raise ValueError(f"{fn}: expected crow ({b + 1},) and cols, values of one length (k,), "
                         f"got {tuple(crow.shape)}, {tuple(cols.shape)}, {tuple(values.shape)}")
    dense = {"g": g, "x": x} if grad_x is None else {"grad_x": grad_x, "g": g, "x": x}
    _check(fn, dense, crow, cols, values)
    if grad_x is not None and (_overlap(grad_x, g) or _overlap(grad_x, x)):
        raise ValueError(f"{fn}: grad_x overlaps g or x in memory")
    lib = _library(fn)
    crow, cols, values = crow.contiguous(), cols.contiguous(), values.contiguous()
    if check:
        _check_csr(fn, lib, b, a, crow, cols)
    k, n = values.numel(), g.shape[0]
    grad_v = torch.zeros(k, dtype=values.dtype)
    if k == 0 or n == 0:
        return grad_v
    partial = torch.empty(-(-n // _CHUNK_TOKENS), k, dtype=values.dtype)
    target = grad_x if grad_x is not None and grad_x.numel() else None
    getattr(lib, f"st_bwd_{_DTYPES[values.dtype]}_{_INDEX[crow.dtype]}")(
        ctypes.c_int64(n), ctypes.c_int64(b), ctypes.c_int64(k), _ptr(g),
        ctypes.c_int64(g.stride(0)), _ptr(x), ctypes.c_int64(x.stride(0)),
        ctypes.c_void_p(None if target is None else target.data_ptr()),
        ctypes.c_int64(0 if target is None else target.stride(0)), _ptr(crow), _ptr(cols),
        _ptr(values), _ptr(partial), _ptr(grad_v), ctypes.c_int(_threads()))
    return grad_v
