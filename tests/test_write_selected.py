"""``write_selected`` (the compact optimizers' write-back: ``scatter_`` or ``index_put_`` by device
and dtype) against plain advanced-index assignment, for every float dtype and index dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from sparsetune.optim.selection import Selection, write_selected

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(numel=st_.integers(1, 300), fraction=st_.floats(0.0, 1.0), seed=st_.integers(0, 2**16))
def test_write_selected_equals_index_assignment(device, dtype, index_dtype, numel, fraction,
                                                seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(numel, generator=g).to(dtype).to(device)
    count = int(numel * fraction)
    index = torch.randperm(numel, generator=g)[:count].to(index_dtype).to(device)
    values = torch.randn(count, generator=g).to(dtype).to(device)
    expected = flat.clone()
    expected[index.long()] = values
    write_selected(flat, index, values)
    assert torch.equal(flat, expected)


def test_selection_scatter_writes_a_non_contiguous_tensor(device):
    base = torch.arange(12.0, device=device).view(3, 4).t()  # (4, 3), not contiguous
    selected = torch.zeros(4, 3, dtype=torch.bool)
    selected[0, 1] = selected[3, 2] = True
    sel = Selection(selected, device)
    expected = base.clone()
    expected[0, 1], expected[3, 2] = -1.0, -2.0
    sel.scatter_(base, torch.tensor([-1.0, -2.0], device=device))
    assert torch.equal(base, expected)
