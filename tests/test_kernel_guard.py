"""A Triton kernel that cannot be built where ``backend="auto"`` chose it (a GPU or Triton
release it was never compiled for) warns once and leaves the work to its torch twin, with the
same result; an explicit ``backend="triton"`` and any later failure still raise. The kernels are
replaced by stand-ins that raise, so this runs with or without Triton."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from sparsetune.kernels import GatherTable, sddmm, sddmm_torch
from sparsetune.kernels import table as table_module

sddmm_module = importlib.import_module("sparsetune.kernels.sddmm")  # the module, not the function


def _broken_module(monkeypatch, name: str, *functions: str) -> list[str]:
    calls: list[str] = []

    def fails(fn):
        def launch(*args, **kwargs):
            calls.append(fn)
            raise RuntimeError(f"{fn}: no kernel image for this device")
        return launch

    module = types.ModuleType(name)
    for fn in functions:
        setattr(module, fn, fails(fn))
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sddmm_module, "_LAUNCHED", {})
    return calls


def test_gather_table_falls_back_to_its_twin_once_with_a_warning(monkeypatch):
    calls = _broken_module(monkeypatch, "sparsetune.kernels._table_triton", "gather_triton",
                           "scatter_triton")
    monkeypatch.setattr(table_module, "_kernel_runs", lambda *args: True)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    indices = [torch.tensor([0, 4, 11], dtype=torch.int32), None]
    table = GatherTable([t.numel() for t in tensors], indices, "cpu", block=4)
    expected = torch.cat([tensors[0].reshape(-1)[[0, 4, 11]], tensors[1]])
    with pytest.warns(RuntimeWarning, match=r"table_gather\[torch.float32->torch.float32\] "
                                            r"failed at its first launch on cpu"):
        assert torch.equal(table.gather(tensors), expected)
    assert torch.equal(table.gather(tensors), expected)  # no second try, no second warning
    assert calls == ["gather_triton"]
    values = torch.arange(table.k, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="table_scatter"):
        table.scatter(tensors, values)
    assert torch.equal(table.gather_torch(tensors, torch.empty(table.k)), values)
    with pytest.raises(RuntimeError, match="no kernel image"):  # asked for by name: raised
        table.gather(tensors, backend="triton")


def test_sddmm_falls_back_to_its_twin_once_with_a_warning(monkeypatch):
    calls = _broken_module(monkeypatch, "sparsetune.kernels._sddmm_triton", "sddmm_triton")
    monkeypatch.setattr(sddmm_module, "kernel_available", lambda *args: True)
    g = torch.Generator().manual_seed(1)
    grad, x = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    rows, cols = torch.tensor([0, 3, 2]), torch.tensor([1, 0, 2])
    with pytest.warns(RuntimeWarning, match=r"sddmm\[torch.float32\] failed"):
        out = sddmm(grad, x, rows, cols)
    assert torch.equal(out, sddmm_torch(grad, x, rows, cols))
    torch.testing.assert_close(out, (grad.t() @ x)[rows, cols])
    sddmm(grad, x, rows, cols)
    assert calls == ["sddmm_triton"]
    with pytest.raises(RuntimeError, match="no kernel image"):
        sddmm(grad, x, rows, cols, backend="triton")
