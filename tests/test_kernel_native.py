"""sparsetune.kernels.native_spmm_add_: the C kernel of a delta's CPU product, out += x M^T,
against float64 dense references and its torch twin (``spmm_add_torch``); its results do not
depend on a token's place in the batch or on the thread count; bad input is refused before any
write; and its compile cache (temporary file and rename, stale files removed, a damaged file
compiled again, no compiler: the twin with a reason).

The kernel must compile wherever a C compiler is found (CI's image has gcc): the tests only skip
where there is none.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from sparse_helpers import random_csr

from sparsetune.kernels import native, native_spmm_add_, spmm_add_torch
from sparsetune.modules import CsrLayout, functions

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None
                                and not os.environ.get("CC"), reason="no C compiler")


def _problem(n, a, b, density, dtype, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    dense, crow, cols, values = random_csr(a, b, density, dtype, g, index_dtype)
    x = torch.randn(n, b, generator=g, dtype=torch.float64).to(dtype)
    out = torch.randn(n, a, generator=g, dtype=torch.float64).to(dtype)
    return dense, crow, cols, values, x, out


def test_the_kernel_compiles_here():
    assert native.native_available(), native.native_unavailable_reason()
    assert native.native_unavailable_reason() is None


# (N, a, b, density): N off the 8-token blocks, one token, k = 0, empty rows, dense rows
CASES = [(37, 50, 70, 0.1), (8, 33, 20, 0.3), (1, 8, 8, 0.5), (70, 10, 10, 0.0),
         (131, 40, 3, 0.9), (16, 1, 1, 1.0)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_kernel_adds_the_product_in_place(case, dtype, index_dtype):
    n, a, b, density = case
    dense, crow, cols, values, x, out = _problem(n, a, b, density, dtype,
                                                 index_dtype=index_dtype)
    expected = out.double() + x.double() @ dense.t()
    got = native_spmm_add_(out, x, crow, cols, values)
    assert got is out and out.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_strided_rows_are_read_and_written_in_place():
    """x and out as column slices of wider buffers (row stride > width): only out's slice
    changes."""
    dense, crow, cols, values, x, out = _problem(19, 12, 9, 0.4, torch.float64)
    xbuf = torch.randn(19, 15, dtype=torch.float64)
    xbuf[:, 3:12] = x
    obuf = torch.randn(19, 20, dtype=torch.float64)
    obuf[:, 5:17] = out
    before = obuf.clone()
    native_spmm_add_(obuf[:, 5:17], xbuf[:, 3:12], crow, cols, values)
    torch.testing.assert_close(obuf[:, 5:17], out + x @ dense.t(), rtol=1e-12, atol=1e-12)
    assert torch.equal(obuf[:, :5], before[:, :5]) and torch.equal(obuf[:, 17:], before[:, 17:])


@settings(max_examples=30)
@given(n=hs.integers(1, 40), a=hs.integers(1, 20), b=hs.integers(1, 20),
       density=hs.floats(0.0, 1.0), seed=hs.integers(0, 2**16))
def test_kernel_equals_the_twin(n, a, b, density, seed):
    _, crow, cols, values, x, out = _problem(n, a, b, density, torch.float64, seed=seed)
    twin = spmm_add_torch(out.clone(), x.t().contiguous(), crow, cols, values)
    torch.testing.assert_close(native_spmm_add_(out, x, crow, cols, values), twin,
                               rtol=1e-12, atol=1e-12)


def test_a_tokens_result_does_not_depend_on_its_place_or_the_thread_count():
    """Each output entry is one sum in CSR order: a token in a full 8-token block equals the
    same token alone (the tail loop), bit for bit, and 1 or 2 threads give the same bits."""
    _, crow, cols, values, x, out = _problem(24, 30, 40, 0.3, torch.float32, seed=3)
    full = native_spmm_add_(out.clone(), x, crow, cols, values)
    for t in (0, 7, 13, 23):
        alone = native_spmm_add_(out[t:t + 1].clone(), x[t:t + 1], crow, cols, values)
        assert torch.equal(alone[0], full[t])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_spmm_add_(out.clone(), x, crow, cols, values)
        torch.set_num_threads(2)
        two = native_spmm_add_(out.clone(), x, crow, cols, values)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full) and torch.equal(two, full)


def test_bad_input_is_refused_before_any_write():
    _, crow, cols, values, x, out = _problem(9, 6, 5, 0.5, torch.float32)
    keep = out.clone()
    bad = [
        ((out, x[:4], crow, cols, values), "expected out"),
        ((out, x, crow[:-1], cols, values), "expected crow"),
        ((out, x, crow, cols, values[:-1]), "expected crow"),
        ((out, x.double(), crow, cols, values), "must share float32 or float64"),
        ((out.bfloat16(), x.bfloat16(), crow, cols, values.bfloat16()), "float32 or float64"),
        ((out, x, crow, cols.int(), values), "must share int32 or int64"),
        ((out, x.t().contiguous().t(), crow, cols, values), "x needs a unit last stride"),
        ((out, torch.zeros(9, 5, dtype=torch.float32, device="meta"), crow, cols, values),
         "x is on meta"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            native_spmm_add_(*args)
    buf = torch.zeros(9, 6)
    with pytest.raises(ValueError, match="overlap"):
        native_spmm_add_(buf, buf[:, :5], crow, cols, values)
    wrong = [(crow + 1, cols, "start at 0"), (crow.flip(0), cols, "start at 0"),
             (torch.tensor([0, 3, 1, 4, 5, 5, crow[-1]]), cols, "must not decrease"),
             (crow, cols + 5, r"cols must lie in \[0, 5\)"), (crow, cols - 9, "cols must lie")]
    for c, k, message in wrong:
        with pytest.raises(ValueError, match=message):
            native_spmm_add_(out, x, c, k, values)
    assert torch.equal(out, keep)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel's loader from scratch, caching under tmp_path."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SPARSETUNE_CACHE", str(tmp_path))
    return tmp_path / "native"


def test_the_compiled_kernel_is_cached_and_reused(fresh):
    fresh.mkdir(parents=True)
    stale, recent = fresh / ".tmp-stale.so", fresh / ".tmp-recent.c"
    stale.write_bytes(b"partial")
    recent.write_bytes(b"another process compiling")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert native.native_available()
    (lib,) = fresh.glob("spmm-*.so")
    assert not stale.exists() and recent.exists()  # stale temporaries removed, live ones kept
    assert sorted(p.name for p in fresh.iterdir()) == sorted([lib.name, recent.name])
    mtime = lib.stat().st_mtime_ns
    native._state.clear()  # a new process: loads the cached file, compiles nothing
    assert native.native_available() and lib.stat().st_mtime_ns == mtime


def test_a_damaged_cache_file_is_compiled_again(fresh):
    """A cached file that does not load (never loaded by this process: a loaded library's
    file is replaced, not written, by the loader) is removed and compiled again."""
    _, target = native._target()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")
    assert native.native_available(), native.native_unavailable_reason()
    assert target.stat().st_size > 1000
    dense, crow, cols, values, x, out = _problem(5, 4, 3, 0.5, torch.float64)
    expected = out + x @ dense.t()
    torch.testing.assert_close(native_spmm_add_(out, x, crow, cols, values), expected)


@pytest.mark.parametrize("env, reason", [({"CC": "false"}, "false failed"),
                                         ({"SPARSETUNE_NATIVE": "0"}, "SPARSETUNE_NATIVE=0")])
def test_without_the_kernel_the_layout_takes_mkl_and_calls_say_why(fresh, monkeypatch, env,
                                                                   reason):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not native.native_available()
    assert reason in native.native_unavailable_reason()
    assert not fresh.exists() or not list(fresh.iterdir())  # nothing half-written
    _, crow, cols, values, x, out = _problem(6, 5, 4, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match=reason):
        native_spmm_add_(out, x, crow, cols, values)
    layout = CsrLayout(torch.tensor([0, 2, 4]), torch.tensor([1, 0, 3]), (5, 4))
    assert layout.cpu_route(torch.ones(3)) == "mkl"
    assert functions.CSR_PER_LINE < functions.NATIVE_PER_LINE


def _forked_product(queue, args):
    queue.put(native_spmm_add_(*args).tolist())


def test_a_forked_child_runs_the_kernel_on_one_thread():
    """GNU OpenMP's pool does not survive a fork: a child forked after the parent ran the
    kernel on 2 threads runs it on one (no hang) and gets the same bits."""
    import multiprocessing

    _, crow, cols, values, x, out = _problem(40, 30, 20, 0.3, torch.float32, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = native_spmm_add_(out.clone(), x, crow, cols, values)
        assert native._threads() == 2
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_forked_product, args=(queue, (out.clone(), x, crow, cols,
                                                                  values)))
        child.start()
        got = queue.get(timeout=60)
        child.join(60)
    finally:
        torch.set_num_threads(threads)
    assert child.exitcode == 0
    assert torch.equal(torch.tensor(got), expected)


def test_flags_the_compiler_refuses_are_dropped(fresh, monkeypatch, tmp_path):
    """A compiler without -march=native (as some clang builds): compiled without it, with
    OpenMP, and the kernel still right."""
    cc = shutil.which("cc") or shutil.which("gcc")
    log = tmp_path / "calls.txt"
    wrapper = tmp_path / "fussy-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *-march=native*) '
                       f'echo "error: unsupported option -march=native" >&2; exit 1;; esac\n'
                       f'exec {cc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.native_available(), native.native_unavailable_reason()
    calls = [line.split() for line in log.read_text().splitlines() if "--version" not in line]
    assert "-march=native" in calls[0] and "-fopenmp" in calls[0]
    assert "-march=native" not in calls[-1] and "-fopenmp" in calls[-1]
    dense, crow, cols, values, x, out = _problem(11, 6, 7, 0.4, torch.float64)
    torch.testing.assert_close(native_spmm_add_(out.clone(), x, crow, cols, values),
                               out + x @ dense.t(), rtol=1e-12, atol=1e-12)


def test_an_unwritable_cache_folder_leaves_the_kernel_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPARSETUNE_CACHE", str(blocker))
    assert not native.native_available()
    assert "could not compile into" in native.native_unavailable_reason()
    layout = CsrLayout(torch.tensor([0, 1]), torch.tensor([1, 0]), (2, 2))
    assert layout.cpu_route(torch.ones(2)) == "mkl"


# -- the backward pass: input gradient g M and the values' gradient in one pass ----------------

def _backward_problem(n, a, b, density, dtype, seed=0, index_dtype=torch.int64):
    """M: (a, b) and its transpose A in CSR, g: (N, a), x: (N, b), grad_x: (N, b); the float64
    references of grad_x + g M and of the values' gradient in A's CSR order."""
    dense, *_ = _problem(1, a, b, density, dtype, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr_t = dense.t().contiguous().to_sparse_csr()
    crow, cols = csr_t.crow_indices().to(index_dtype), csr_t.col_indices().to(index_dtype)
    values = csr_t.values().to(dtype)
    g_ = torch.Generator().manual_seed(seed + 1)
    g, x, grad_x = (torch.randn(n, w, generator=g_, dtype=torch.float64).to(dtype)
                    for w in (a, b, b))
    rows = torch.repeat_interleave(torch.arange(b), csr_t.crow_indices().diff())
    ref_v = (g.double()[:, csr_t.col_indices()] * x.double()[:, rows]).sum(0)
    ref_x = grad_x.double() + g.double() @ dense
    return crow, cols, values, g, x, grad_x, ref_v, ref_x


@pytest.mark.parametrize("n", [1, 7, 8, 129, 300], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_backward_gives_both_gradients(n, dtype, index_dtype):
    """N across the 8-token blocks and the 128-token chunks of the values' sums."""
    crow, cols, values, g, x, grad_x, ref_v, ref_x = _backward_problem(
        n, 23, 17, 0.3, dtype, index_dtype=index_dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    got_v = native.native_spmm_backward_(grad_x, g, x, crow, cols, values)
    assert got_v.dtype == dtype
    torch.testing.assert_close(got_v.double(), ref_v, **tol)
    torch.testing.assert_close(grad_x.double(), ref_x, **tol)
    alone = native.native_spmm_backward_(None, g, x, crow, cols, values)  # no input gradient
    assert torch.equal(alone, got_v)


@settings(max_examples=25)
@given(n=hs.integers(1, 300), a=hs.integers(1, 12), b=hs.integers(1, 12),
       density=hs.floats(0.0, 1.0), seed=hs.integers(0, 2**16))
def test_backward_equals_float64_references(n, a, b, density, seed):
    crow, cols, values, g, x, grad_x, ref_v, ref_x = _backward_problem(
        n, a, b, density, torch.float64, seed=seed)
    got_v = native.native_spmm_backward_(grad_x, g, x, crow, cols, values)
    torch.testing.assert_close(got_v, ref_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-12, atol=1e-12)


def test_backward_bits_do_not_depend_on_the_thread_count():
    crow, cols, values, g, x, grad_x, _, _ = _backward_problem(300, 30, 40, 0.3, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            gx = grad_x.clone()
            results.append((native.native_spmm_backward_(gx, g, x, crow, cols, values), gx))
    finally:
        torch.set_num_threads(threads)
    for gv, gx in results[1:]:
        assert torch.equal(gv, results[0][0]) and torch.equal(gx, results[0][1])


def test_backward_refuses_bad_input_before_any_write():
    crow, cols, values, g, x, grad_x, _, _ = _backward_problem(9, 6, 5, 0.5, torch.float32)
    keep = grad_x.clone()
    fn = native.native_spmm_backward_
    bad = [((grad_x, g, x[:4], crow, cols, values), "expected g"),
           ((grad_x[:, :4], g, x, crow, cols, values), "expected grad_x of x's shape"),
           ((grad_x, g, x, crow[:-1], cols, values), "expected crow"),
           ((grad_x, g.double(), x, crow, cols, values), "must share float32 or float64"),
           ((grad_x, g, x, crow, cols + 6, values), r"cols must lie in \[0, 6\)"),
           ((grad_x, g, x, crow.flip(0), cols, values), "start at 0")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            fn(*args)
    with pytest.raises(ValueError, match="overlaps"):
        fn(x, g, x, crow, cols, values)
    assert torch.equal(grad_x, keep)
