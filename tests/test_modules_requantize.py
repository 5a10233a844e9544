"""DeltaHandle.merge(requantize=True) over a torchao int8 weight-only base (issue 24).

References are computed here from the public torchao API: the exact merged weight
E = dequantize(W0) with (theta0 + v rounded to the weight dtype) at the selected entries; the
reported errors must equal those of dequantize(requantized) - E; blocks the delta stays inside
keep their scale and unselected integers; unmerge gives back the original quantized weight.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import sparsetune as st

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="torchao is a test dependency (the quant extra)")


def _quantized(dtype: torch.dtype = torch.float32, only_first: bool = False) -> nn.Sequential:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    first = model[0]
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=(lambda m, _: m is first) if only_first else None)
    return model


def _attach(model: nn.Module, scale: float) -> st.DeltaHandle:
    g = torch.Generator().manual_seed(1)
    mask = st.Mask.from_dict({n: torch.rand(p.shape, generator=g) < 0.2
                              for n, p in model.named_parameters()})
    handle = st.attach(model, mask, name="task")
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return handle


def _exact(weight: torch.Tensor, handle: st.DeltaHandle, layer: str) -> torch.Tensor:
    """E, written entry by entry from the handle's values."""
    exact = weight.dequantize().clone()
    values = dict(handle.named_parameters())[f"{layer}.weight"].detach()
    rows, cols = _indices(handle, layer)
    for j in range(values.numel()):
        r, c = int(rows[j]), int(cols[j])
        exact[r, c] = (exact[r, c].float() + values[j].float()).to(exact.dtype)
    return exact


def _indices(handle: st.DeltaHandle, layer: str) -> torch.Tensor:
    return handle.model.get_submodule(layer).sparse_deltas.deltas[handle.name].weight_indices


def _inner(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weight.qdata.clone(), weight.scale.clone()


def test_merge_refuses_a_quantized_base_without_requantize():
    model = _quantized()
    handle = _attach(model, 0.05)
    weights = [model[0].weight, model[2].weight]
    with pytest.raises(st.InvalidArgumentError, match=r"\['0', '2'\].*requantize=True"):
        handle.merge()
    assert not handle.merged
    assert model[0].weight is weights[0] and model[2].weight is weights[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantized_merge_reports_its_error_and_unmerge_restores_the_base(dtype):
    from torchao.quantization import Int8Tensor

    model = _quantized(dtype)
    handle = _attach(model, 0.05)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    originals = {name: model.get_submodule(name).weight for name in ("0", "2")}
    stored = {name: _inner(w) for name, w in originals.items()}
    exact = {name: _exact(w, handle, name) for name, w in originals.items()}
    with torch.no_grad():
        attached_out = model(x)
    reports = handle.merge(requantize=True)
    assert handle.merged and sorted(reports) == ["0", "2"]
    for name, report in reports.items():
        new = model.get_submodule(name).weight
        assert isinstance(new, Int8Tensor) and not new.requires_grad
        assert list(new.block_size) == list(originals[name].block_size)
        e = exact[name].double()
        diff = new.dequantize().double() - e
        sel = tuple(_indices(handle, name))
        assert report.layer == name
        assert report.max_abs_error == float(diff.abs().max())
        assert report.relative_error == pytest.approx(float(diff.norm() / e.norm()), rel=1e-12)
        assert report.selected_max_abs_error == float(diff[sel].abs().max())
        assert report.selected_relative_error == pytest.approx(
            float(diff[sel].norm() / e[sel].norm()), rel=1e-12)
        # rows whose range the delta stayed inside keep their scale and unselected integers,
        # and each selected entry lands on the nearest grid point: within half a step
        q0, s0 = stored[name]
        kept = (new.scale == s0)[:, 0]
        assert report.rescaled_blocks == int((~kept).sum()) and report.blocks == kept.numel()
        unselected = torch.ones_like(q0, dtype=torch.bool)
        unselected[sel] = False
        assert torch.equal(new.qdata[kept][unselected[kept]], q0[kept][unselected[kept]])
        half_step = s0.double().expand_as(e) / 2 + torch.finfo(dtype).eps * e.abs()
        assert bool((diff[kept].abs() <= half_step[kept]).all())
    # the merged int8 model is close to the exact float merge: for the first layer, the
    # output error is bounded by |R - E| @ |x|
    first = model[0]
    with torch.no_grad():
        got = nn.functional.linear(x, first.weight, first.bias).double()
        ref = nn.functional.linear(x.double(), exact["0"].double(), first.bias.double())
        error = (first.weight.dequantize().double() - exact["0"].double()).abs()
        bound = error @ x.double().abs().t()
        slack = 1e-5 if dtype == torch.float32 else 0.05
        assert bool(((got - ref).abs() <= bound.t() + slack * (1 + ref.abs())).all())
        merged_out = model(x)
    tol = 0.02 if dtype == torch.float32 else 0.06
    torch.testing.assert_close(merged_out.float(), attached_out.float(), rtol=0, atol=tol)
    handle.unmerge()
    for name, w in originals.items():
        assert model.get_submodule(name).weight is w
        assert torch.equal(w.qdata, stored[name][0]) and torch.equal(w.scale, stored[name][1])
    with torch.no_grad():
        assert torch.equal(model(x), attached_out)


def test_a_delta_that_leaves_a_rows_range_takes_torchaos_scale_for_that_row():
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    model = _quantized()
    handle = _attach(model, 0.05)
    values = dict(handle.named_parameters())["0.weight"]
    rows = _indices(handle, "0")[0]
    with torch.no_grad():
        values[rows == int(rows[0])] = 10.0  # far outside row rows[0]'s range
    s0 = model[0].weight.scale.clone()
    exact = _exact(model[0].weight, handle, "0")
    report = handle.merge(requantize=True)["0"]
    new = model[0].weight
    fresh = Int8Tensor.from_hp(exact, PerRow()).scale
    r = int(rows[0])
    assert report.rescaled_blocks >= 1
    assert torch.equal(new.scale[r], fresh[r]) and not torch.equal(new.scale[r], s0[r])
    assert report.max_abs_error <= float(fresh[r]) / 2 * (1 + 2**-7)
    handle.unmerge()
    assert torch.equal(model[0].weight.scale, s0)


def test_a_mixed_base_merges_float_layers_exactly_and_reports_the_quantized_ones():
    model = _quantized(only_first=True)
    assert type(model[2].weight.data) is torch.Tensor
    handle = _attach(model, 0.05)
    plain_before = model[2].weight.detach().clone()
    reports = handle.merge(requantize=True)
    assert list(reports) == ["0"]
    values = dict(handle.named_parameters())["2.weight"].detach()
    rows, cols = _indices(handle, "2")
    expected = plain_before.clone()
    expected[rows, cols] = plain_before[rows, cols] + values
    assert torch.equal(model[2].weight, expected)
    handle.unmerge()
    assert torch.equal(model[2].weight, plain_before)


def test_an_unsupported_quantized_weight_is_refused_before_any_layer_changes():
    model = _quantized()
    handle = _attach(model, 0.05)
    first = model[0].weight
    model[2].weight.zero_point = torch.ones_like(model[2].weight.zero_point)  # asymmetric
    with pytest.raises(st.InvalidArgumentError, match=r"layer '2'.*zero point"):
        handle.merge(requantize=True)
    assert model[0].weight is first and not handle.merged
