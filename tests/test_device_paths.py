"""The GPU-facing fast paths on every available device (the ``device`` fixture: CPU here, CUDA
too where present, so a lent GPU's ``pytest -m device`` checks them there): the gather table and
the SDDMM kernel (chosen by ``backend="auto"``: Triton on CUDA, the twin on the CPU) against
plain indexing; SparseAdamW's flat step against torch AdamW on the selected entries; delta
modules against the dense W0 + S they stand for. A kernel that fails to build turns into a test
failure (pyproject's filterwarnings), not a silent fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune.kernels import GatherTable, sddmm
from sparsetune.modules import SLOT
from sparsetune.modules.attach import base_parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_table_moves_the_listed_entries(device, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(300,), (17, 40), (5,), (64, 64)]
    tensors = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    indices = [torch.tensor([0, 7, 299]), None,
               torch.zeros(0, dtype=torch.int64), torch.randperm(4096, generator=g)[:700].sort()[0]]
    indices = [None if i is None else i.to(device=device, dtype=torch.int32) for i in indices]
    table = GatherTable([t.numel() for t in tensors], indices, device)
    expected = torch.cat([t.reshape(-1) if i is None else t.reshape(-1)[i.long()]
                          for t, i in zip(tensors, indices, strict=True)])
    assert torch.equal(table.gather(tensors), expected)
    into = torch.empty(table.k, dtype=torch.float32, device=device)  # widened in the launch
    assert torch.equal(table.gather(tensors, into), expected.float())
    values = torch.randn(table.k, generator=g).to(device)
    untouched = [t.clone() for t in tensors]
    table.scatter(tensors, values)
    assert torch.equal(table.gather(tensors), values.to(dtype))
    for t, before, i in zip(tensors, untouched, indices, strict=True):
        if i is not None:  # entries off the list keep their bits
            keep = torch.ones(t.numel(), dtype=torch.bool, device=device)
            keep[i.long()] = False
            assert torch.equal(t.reshape(-1)[keep], before.reshape(-1)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sddmm_is_the_sampled_product(device, dtype):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(96, 40, generator=gen).to(device, dtype)
    x = torch.randn(96, 24, generator=gen).to(device, dtype)
    flat = torch.randperm(40 * 24, generator=gen)[:150].to(device)
    rows, cols = flat // 24, flat % 24
    out = sddmm(grad, x, rows, cols)
    assert out.dtype == torch.float32
    exact = (grad.double().t() @ x.double())[rows, cols]
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)


def test_sparse_adamw_flat_step_equals_adamw_on_the_selected_entries(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    reference = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    mask = st.Mask.from_dict({n: torch.rand(p.shape, generator=g) < 0.3
                              for n, p in model.named_parameters()})
    opt = st.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1, impl="flat")
    dense = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        x = torch.randn(8, 12, generator=g).to(device)
        for m, o in ((model, opt), (reference, dense)):
            o.zero_grad()
            m(x).square().mean().backward()
        for n, p in reference.named_parameters():  # dense AdamW, then keep the selected ones
            p.grad.mul_(mask[n].to(device))
        saved = {n: p.detach().clone() for n, p in reference.named_parameters()}
        opt.step()
        dense.step()
        with torch.no_grad():
            for n, p in reference.named_parameters():
                keep = ~mask[n].to(device)
                p[keep] = saved[n][keep]  # frozen entries: no decay either
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, reference.get_parameter(n), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        frozen = ~mask[n].to(device)
        assert torch.equal(p.detach()[frozen], before[n][frozen])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attached_delta_is_the_dense_sum_forward_and_backward(device, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 14), nn.Tanh(), nn.Linear(14, 4)).to(device, dtype)
    g = torch.Generator().manual_seed(3)
    bits = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    handle = st.attach(model, st.Mask.from_dict(bits), name="task")
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(device))
    dense = {n: p.detach().float().clone() for n, p in base_parameters(model).items()}
    x = torch.randn(6, 10, generator=g).to(device, dtype).requires_grad_()
    out = model(x)
    out.float().square().sum().backward()
    # the reference: W0 + S built densely in float32 from the slots' indices and values
    delta = _values_by_parameter(model)
    weights = {n: dense[n] + delta.get(n, torch.zeros_like(dense[n])) for n in dense}
    xr = x.detach().float().requires_grad_()
    h = torch.tanh(nn.functional.linear(xr, weights["0.weight"], weights["0.bias"]).to(dtype))
    ref = nn.functional.linear(h.float(), weights["2.weight"], weights["2.bias"])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in handle.parameters())


def _values_by_parameter(model) -> dict[str, torch.Tensor]:
    """name -> the dense float32 delta S of each covered weight and bias."""
    out = {}
    modules = dict(model.named_modules())
    for layer_name in {n.split(".")[0] for n, _ in model.named_parameters()}:
        slot = getattr(modules[layer_name], SLOT, None)
        if slot is None:
            continue
        d = slot.deltas["task"]
        w = torch.zeros(slot.shape, device=d.weight_values.device)
        w[d.weight_indices[0], d.weight_indices[1]] = d.weight_values.detach()
        out[f"{layer_name}.weight"] = w
        if d.bias_indices is not None:
            b = torch.zeros(slot.shape[0], device=w.device)
            b[d.bias_indices] = d.bias_values.detach()
            out[f"{layer_name}.bias"] = b
    return out


def test_gather_table_follows_tensors_replaced_behind_its_back(device):
    """The table caches the tensors' addresses on CUDA (keyed by their values): storage swapped
    in behind its back (``p.data = ...``, a reloaded checkpoint) and storage freed and reused
    must be read from where it is now."""
    g = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.randn(50, generator=g).to(device)) for _ in range(3)]
    indices = [torch.tensor([1, 2, 40], device=device), None, torch.tensor([0], device=device)]
    table = GatherTable([50, 50, 50], indices, device)

    def reference():
        return torch.cat([p.detach()[i] if i is not None else p.detach()
                          for p, i in zip(params, indices, strict=True)])

    for round_ in range(6):
        assert torch.equal(table.gather([p.detach() for p in params]), reference()), round_
        which = round_ % 3
        params[which].data = torch.randn(50, generator=g).to(device)  # new storage
        if round_ % 2 and device.type == "cuda":
            torch.cuda.empty_cache()  # freed blocks may come back at the old addresses
    values = torch.arange(table.k, dtype=torch.float32, device=device)
    table.scatter([p.detach() for p in params], values)
    assert torch.equal(reference(), values)
