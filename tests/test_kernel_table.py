"""sparsetune.kernels.GatherTable: one launch gathers (scatters) the selected entries of many
tensors through a table of their addresses, and the flat optimizer step built on it (issue 23).

The kernel runs here under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, where
the table's addresses are host addresses). The variable is set by conftest's ``interpreter``
fixture, which also sets aside any compiled build of :mod:`sparsetune.kernels._table_triton`
(Triton picks the interpreter when the ``@triton.jit`` functions are defined, at import) and
restores it after, so the rest of the session is left alone. Every comparison is exact: the
kernel only moves values (casts in it are widening, exact; rounding casts are torch's).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sparsetune import Mask, SparseAdamW, SparseSGD
from sparsetune.kernels import GatherTable
from sparsetune.kernels import table as table_module
from sparsetune.optim import flat as flat_module
from sparsetune.optim.flat import FlatGroup
from sparsetune.optim.selection import Selection

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL = "sparsetune.kernels._table_triton"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def launches(interpreter, monkeypatch):
    """Counts of the kernel's launches: {"gather": n, "scatter": n}."""
    kernel = importlib.import_module(KERNEL)
    counts = {"gather": 0, "scatter": 0}
    for name in counts:
        launch = getattr(kernel, f"{name}_triton")

        def counted(*args, _launch=launch, _name=name):
            counts[_name] += 1
            return _launch(*args)

        monkeypatch.setattr(kernel, f"{name}_triton", counted)
    return counts


# -- cases ------------------------------------------------------------------------------------
def _case(seed: int, dtype: torch.dtype, index_dtype: torch.dtype = torch.int64):
    """Tensors of several shapes and their selections: every entry, some (sorted or not),
    none, an empty tensor, one over several blocks."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (300,), (5,), (40, 13), (0,), (9, 1, 2), (1,)]
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    some = [torch.randperm(t.numel(), generator=gen)[: t.numel() // 3] for t in tensors]
    indices = [None, some[1].sort().values, torch.empty(0, dtype=torch.int64),
               some[3], None, some[5].sort().values, None]
    indices = [None if i is None else i.to(index_dtype) for i in indices]
    return tensors, indices


def _reference(tensors, indices):
    return torch.cat([t.reshape(-1) if i is None else t.reshape(-1)[i.long()]
                      for t, i in zip(tensors, indices)])


def _table(tensors, indices, block=64):
    return GatherTable([t.numel() for t in tensors], indices, "cpu", block=block)


# -- the twin, everywhere ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_twin_gathers_and_scatters_the_listed_entries(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, KERNEL, None)  # "auto" must not even import the kernel
    tensors, indices = _case(0, dtype, torch.int32)
    table = _table(tensors, indices)
    assert table.k == sum(s.stop - s.start for s in table.slices)
    assert table.index.dtype == torch.int32
    torch.testing.assert_close(table.gather(tensors), _reference(tensors, indices), rtol=0, atol=0)
    values = torch.randn(table.k, dtype=torch.float64)
    table.scatter(tensors, values)
    assert torch.equal(_reference(tensors, indices), values.to(dtype))


def test_block_table_rows():
    tensors, indices = _case(1, torch.float32)
    table = _table(tensors, indices, block=64)
    rows = table.blocks.tolist()
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    for tensor, start, end, base, every in rows:
        part = table.slices[tensor]
        assert part.start <= start < end <= part.stop and end - start <= 64
        assert every == (indices[tensor] is None)
        if every:
            assert base == start - part.start
    # every entry of every tensor is covered once; the empty selections own no block
    assert sum(r[2] - r[1] for r in rows) == table.k
    assert {r[0] for r in rows} == {i for i, c in enumerate(table.counts) if c}


def test_validation():
    tensors, indices = _case(2, torch.float32)
    table = _table(tensors, indices)
    with pytest.raises(ValueError, match="built for 7 tensors"):
        table.gather(tensors[:-1])
    with pytest.raises(ValueError, match="entries"):
        table.gather([*tensors[:-1], torch.zeros(2)])
    with pytest.raises(ValueError, match="mixed dtypes"):
        table.gather([*tensors[:-1], tensors[-1].double()])
    with pytest.raises(ValueError, match="not contiguous"):
        table.gather([tensors[0].t().contiguous().t(), *tensors[1:]])
    with pytest.raises(ValueError, match="meta"):
        table.gather([*tensors[:-1], torch.zeros(1, device="meta")])
    with pytest.raises(ValueError, match="not strided"):
        table.gather([*tensors[:-1], torch.zeros(1).to_sparse()])
    with pytest.raises(ValueError, match="float16"):
        table.gather([t.int() for t in tensors])
    with pytest.raises(ValueError, match="out must be 1-D"):
        table.gather(tensors, torch.empty(table.k + 1))
    with pytest.raises(ValueError, match="values must be 1-D"):
        table.scatter(tensors, torch.empty(table.k, 1))
    with pytest.raises(ValueError, match="backend"):
        table.gather(tensors, backend="cuda")
    with pytest.raises(ValueError, match="kernel takes"):
        table.gather([t.double() for t in tensors], backend="triton")
    with pytest.raises(ValueError, match="outside its tensor"):
        GatherTable([4], [torch.tensor([4])], "cpu")
    with pytest.raises(ValueError, match="integer"):
        GatherTable([4], [torch.tensor([1.0])], "cpu")
    with pytest.raises(ValueError, match="1 numels but 2"):
        GatherTable([4], [None, None], "cpu")
    with pytest.raises(ValueError, match="power of two"):
        GatherTable([4], [None], "cpu", block=100)


def test_the_kernel_is_not_used_for_device_tensors_under_the_interpreter(monkeypatch):
    """The interpreter copies a CUDA argument to the host, not the tensors the table points
    to: auto never picks the kernel off CPU under it (and on CPU only under it)."""
    monkeypatch.setattr(table_module, "kernel_available", lambda device_type, dtype=None: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert table_module._kernel_runs("cpu", torch.float32)
    assert not table_module._kernel_runs("cuda", torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert table_module._kernel_runs("cuda", torch.bfloat16)


def test_the_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import sparsetune, sparsetune.kernels, "
            "sparsetune.optim.flat; assert 'sparsetune.kernels._table_triton' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the kernel (interpreter) -----------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_the_twin(dtype, index_dtype, launches):
    tensors, indices = _case(3, dtype, index_dtype)
    table = _table(tensors, indices)
    got = table.gather(tensors, backend="triton")
    assert launches["gather"] == 1
    assert torch.equal(got, table.gather(tensors, backend="torch"))
    assert torch.equal(got, _reference(tensors, indices))
    for out_dtype in DTYPES:  # widening casts in the kernel, rounding ones by torch
        out = table.gather(tensors, torch.empty(table.k, dtype=out_dtype), backend="triton")
        assert torch.equal(out, got.to(out_dtype)), out_dtype
    for values_dtype in DTYPES:
        values = torch.randn(table.k, generator=torch.Generator().manual_seed(4)).to(values_dtype)
        fast, slow = [t.clone() for t in tensors], [t.clone() for t in tensors]
        versions = [t._version for t in fast]
        table.scatter(fast, values, backend="triton")
        table.scatter(slow, values, backend="torch")
        for a, b in zip(fast, slow):
            assert torch.equal(a, b), values_dtype
        assert all(t._version > v for t, v in zip(fast, versions))  # autograd is told
    assert launches["scatter"] == len(DTYPES)


@needs_triton
def test_auto_runs_the_kernel_under_the_interpreter(launches):
    tensors, indices = _case(5, torch.bfloat16)
    table = _table(tensors, indices)
    table.gather(tensors)
    table.scatter(tensors, table.gather(tensors, torch.empty(table.k)))
    table.gather([t.double() for t in tensors])  # no kernel for float64: the twin
    assert launches == {"gather": 2, "scatter": 1}
    empty = GatherTable([3], [torch.empty(0, dtype=torch.int64)], "cpu")
    assert empty.gather([torch.ones(3)]).numel() == 0  # k = 0: nothing launched


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    sizes=hs.lists(hs.integers(0, 150), min_size=1, max_size=6),
    picks=hs.lists(hs.sampled_from(["all", "some", "none", "shuffled"]), min_size=6,
                   max_size=6),
    dtype=hs.sampled_from(DTYPES),
    block=hs.sampled_from([16, 128]),
    seed=hs.integers(0, 2**16),
)
def test_kernel_equals_the_twin_on_random_tables(interpreter, sizes, picks, dtype, block,
                                                  seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    indices = []
    for t, pick in zip(tensors, picks):
        order = torch.randperm(t.numel(), generator=gen)[: t.numel() // 2]
        indices.append({"all": None, "none": order[:0], "some": order.sort().values,
                        "shuffled": order}[pick])
    table = _table(tensors, indices, block)
    got = table.gather(tensors, backend="triton")
    assert torch.equal(got, _reference(tensors, indices))
    values = torch.randn(table.k, generator=gen).to(dtype)
    fast, slow = [t.clone() for t in tensors], [t.clone() for t in tensors]
    table.scatter(fast, values, backend="triton")
    table.scatter_torch(slow, values)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


# -- the flat optimizer step on the table -----------------------------------------------------
def _model(tensors: int, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(tensors)
    shapes = [((i % 3 + 1) * 5, 4) if i % 2 else (11 + i,) for i in range(tensors)]
    return nn.ParameterList(
        [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    )


def _mask(model: nn.Module) -> Mask:
    """Every kind of selection: all, none, some."""
    gen = torch.Generator().manual_seed(0)
    entries = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 5 == 0:
            entries[name] = torch.ones(p.shape, dtype=torch.bool)
        elif i % 5 == 3:
            entries[name] = torch.zeros(p.shape, dtype=torch.bool)
        else:
            entries[name] = torch.rand(p.shape, generator=gen) < 0.3
    return Mask(entries)


def _selected(model: nn.Module) -> tuple[list[nn.Parameter], list[Selection]]:
    """The parameters with selected entries and their selections (as the optimizers build a
    group's FlatGroup)."""
    mask, params, sels = _mask(model), [], []
    for name, p in model.named_parameters():
        sel = Selection(mask[name], p.device)
        if sel.kind != "none":
            params.append(p)
            sels.append(sel)
    return params, sels


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() ** 2 for p in model)
    loss.backward()


def _trained(cls, dtype, table, monkeypatch, steps=3, **hyper):
    monkeypatch.setattr(flat_module, "TABLE", table)
    model = _model(10, dtype)
    opt = cls(model, _mask(model), impl="flat", **hyper)
    for seed in range(steps):
        opt.zero_grad()
        _backward(model, seed)
        opt.step()
    return model, opt


OPTIMIZERS = [
    (SparseAdamW, torch.float32, dict(lr=0.01, weight_decay=0.1)),
    (SparseAdamW, torch.bfloat16, dict(lr=0.01, master_weights=True)),
    (SparseAdamW, torch.float16, dict(lr=0.01, amsgrad=True, decay_to="init")),
    (SparseAdamW, torch.bfloat16, dict(lr=0.01, master_weights=False)),
    (SparseSGD, torch.float32, dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    (SparseSGD, torch.bfloat16, dict(lr=0.01, momentum=0.9, nesterov=True)),
]


@needs_triton
@pytest.mark.parametrize(("cls", "dtype", "hyper"), OPTIMIZERS,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_flat_step_on_the_table_equals_the_loops(cls, dtype, hyper, launches, monkeypatch):
    fast, fast_opt = _trained(cls, dtype, True, monkeypatch, **hyper)
    assert launches["gather"] >= 2 and launches["scatter"] >= 1
    slow, slow_opt = _trained(cls, dtype, False, monkeypatch, **hyper)
    assert [f.table is not None for f in fast_opt._flats.values()] == [True]
    assert [f.table is not None for f in slow_opt._flats.values()] == [False]
    for p, q in zip(fast, slow):
        assert torch.equal(p, q)
    a, b = fast_opt.state_dict()["state"], slow_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            other = b[key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


@needs_triton
def test_the_table_is_the_default_where_the_kernel_runs(interpreter, monkeypatch):
    model = _model(4, torch.float32)
    _backward(model, 0)
    params, sels = _selected(model)
    assert FlatGroup(params, sels, [], {}).table is not None  # under the interpreter
    assert FlatGroup(params, sels, [], {}, table=False).table is None
    assert FlatGroup(params, sels, [], {}, pack=True).table is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert FlatGroup(params, sels, [], {}).table is None  # CPU: the loops
    monkeypatch.setattr(flat_module, "TABLE", True)
    assert FlatGroup(params, sels, [], {}).table is not None  # forced: its twin runs


@needs_triton
def test_gradients_the_kernel_cannot_take_go_parameter_by_parameter(launches):
    model = _model(6, torch.float32)
    _backward(model, 1)
    params, sels = _selected(model)
    fast = FlatGroup(params, sels, [], {}, table=True)
    slow = FlatGroup(params, sels, [], {}, table=False)
    assert torch.equal(fast.gather_gradients(), slow.gather_gradients())
    assert launches["gather"] == 1
    grads = [p.grad for p in params]
    for spoil in ("transposed", "bf16"):
        if spoil == "transposed":  # a non-contiguous gradient of the right shape
            params[1].grad = grads[1].t().contiguous().t()
        else:  # gradients of mixed dtypes
            params[2].grad_dtype = None  # torch >= 2.9 checks .grad's dtype unless told
            params[2].grad = grads[2].bfloat16()
        for dtype in (None, torch.float64):
            assert torch.equal(fast.gather_gradients(dtype), slow.gather_gradients(dtype))
        assert launches["gather"] == 1  # the per-parameter fallback
        params[1].grad, params[2].grad = grads[1], grads[2]
    assert torch.equal(fast.gather_gradients(torch.float64),
                       slow.gather_gradients(torch.float64))  # the table's twin: no kernel
    assert launches["gather"] == 1


def _aten_ops_of_a_step(cls, tensors: int, dtype: torch.dtype, launches=None, **hyper):
    """The aten ops of one step (dense gradients present), and the kernel launches in it
    when ``launches`` (the fixture's counts) is given."""
    model = _model(tensors, dtype)
    opt = cls(model, _mask(model), impl="flat", **hyper)
    for seed in range(3):  # the first steps build the state and the flat buffers
        opt.zero_grad()
        _backward(model, seed)
        if seed < 2:
            opt.step()
    before = dict(launches or {})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    if launches is None:
        return ops
    return ops, {name: launches[name] - before[name] for name in launches}


@needs_triton
@pytest.mark.parametrize(
    ("cls", "dtype", "hyper"),
    [(SparseAdamW, torch.float32, dict(lr=0.01)),
     (SparseAdamW, torch.bfloat16, dict(lr=0.01)),
     (SparseSGD, torch.float32, dict(lr=0.01, momentum=0.9))],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_aten_ops_of_a_flat_step_do_not_grow_with_the_tensors(cls, dtype, hyper, launches,
                                                              monkeypatch):
    """Counted as in tests/test_optimizer_launches.py; the interpreter's own aten ops (it
    re-wraps each kernel argument) are a fixed number per launch, so they do not depend on
    the number of tensors either. The loops grow with it (checked as a contrast)."""
    monkeypatch.setattr(flat_module, "TABLE", True)
    few, in_few = _aten_ops_of_a_step(cls, 10, dtype, launches, **hyper)
    many, in_many = _aten_ops_of_a_step(cls, 200, dtype, launches, **hyper)
    assert few == many, f"{cls.__name__}: {few} aten ops for 10 tensors, {many} for 200"
    # one step, one group: the values and the gradients gathered, the values written back
    assert in_few == in_many == {"gather": 2, "scatter": 1}
    monkeypatch.setattr(flat_module, "TABLE", False)
    assert _aten_ops_of_a_step(cls, 200, dtype, **hyper) > 5 * few


@needs_triton
def test_flat_step_on_the_table_follows_data_swaps_and_micro_batches(interpreter, monkeypatch):
    """As the packed test does: module zero_grad some steps, p.grad = None once, a p.data swap
    once, two micro-batches per step; the table path equals the for-loop exactly (float32)."""
    monkeypatch.setattr(flat_module, "TABLE", True)
    a = _model(8, torch.float32)
    b = copy.deepcopy(a)
    mask = _mask(a)
    fast = SparseAdamW(a, mask, lr=0.05, weight_decay=0.1, impl="flat")
    slow = SparseAdamW(b, mask, lr=0.05, weight_decay=0.1, impl="forloop")
    for step in range(6):
        for m, o in ((a, fast), (b, slow)):
            (m.zero_grad if step % 2 else o.zero_grad)()
            _backward(m, 2 * step)
            _backward(m, 2 * step + 1)
            if step == 3:
                m[4].grad = None
            if step == 4:
                m[1].data = m[1].data * 0.5
            o.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(f.table is not None for f in fast._flats.values()) and fast._flats
    assert os.environ["TRITON_INTERPRET"] == "1"
