"""sparsetune.attach: sparse deltas as modules over a frozen base (issue 24).

float64 references: the outputs and gradients of the attached model equal those of the dense
model W0 + S; training through attach equals in-place SparseAdamW; merge/unmerge/remove are
exact bit for bit; several deltas hot-swap; deltas round-trip through SparseDelta files.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune.modules import SLOT, merged_weight_values

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is installed in the dev environment
    Conv1D = None


class Tiny(nn.Module):
    """Embedding -> Linear -> tanh -> Conv1D (transformers) -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(23, 8, padding_idx=0)
        self.fc = nn.Linear(8, 10)
        self.conv = Conv1D(7, 10) if Conv1D is not None else nn.Linear(10, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(self.emb(ids)))
        return self.head(torch.tanh(self.conv(h))).mean(1)


def _model(dtype: torch.dtype = torch.float64, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _mask(model: nn.Module, density: float = 0.3, seed: int = 1) -> st.Mask:
    g = torch.Generator().manual_seed(seed)
    bits = {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}
    return st.Mask.from_dict(bits)


def _ids(seed: int = 2, shape: tuple[int, int] = (4, 6)) -> torch.Tensor:
    return torch.randint(0, 23, shape, generator=torch.Generator().manual_seed(seed))


def _bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def _randomize(handle: st.DeltaHandle, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def test_outputs_and_gradients_equal_the_dense_float64_model():
    model, mask = _model(), _mask(_model())
    ids = _ids()
    handle = st.attach(model, mask, name="task")
    _randomize(handle)
    x_grads = {}

    def keep(key: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.register_hook(lambda g: x_grads.__setitem__(key, g))
        return hook

    model.fc.register_forward_hook(keep("attached"))
    loss = model(ids).square().sum()
    loss.backward()

    dense = _model()
    handle_delta = handle.to_delta()
    handle_delta.apply_to(dense)
    dense.fc.register_forward_hook(keep("dense"))
    dense_loss = dense(ids).square().sum()
    dense_loss.backward()
    assert abs(float(loss) - float(dense_loss)) < 1e-12
    torch.testing.assert_close(x_grads["attached"], x_grads["dense"], rtol=0, atol=1e-12)
    dense_params = dict(dense.named_parameters())
    assert {n for n, _ in handle.named_parameters()} == {
        n for n in dense_params if bool(mask[n].any())}
    for name, values in handle.named_parameters():
        index = handle_delta.entries[name].index
        flat = dense_params[name].grad.reshape(-1)
        expected = flat if index is None else flat[index]
        torch.testing.assert_close(values.grad, expected, rtol=0, atol=1e-12)


def test_base_is_frozen_never_written_and_state_dict_unchanged():
    model = _model(torch.float32)
    keys, before = list(model.state_dict()), _bytes(model)
    handle = st.attach(model, _mask(model), name="task")
    assert all(not p.requires_grad for n, p in model.named_parameters() if SLOT not in n)
    assert list(model.state_dict()) == keys
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, fused=True)
    for step in range(3):
        opt.zero_grad()
        model(_ids(step)).square().sum().backward()
        opt.step()
    assert _bytes(model) == before
    assert any(bool(p.abs().sum() > 0) for p in handle.parameters())
    model.load_state_dict(model.state_dict())  # strict: no missing or unexpected keys
    model.to(torch.bfloat16)  # the base is cast, the values keep float32
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    assert model.fc.weight.dtype == torch.bfloat16
    model(_ids())


def test_training_through_attach_equals_in_place_sparse_adamw():
    mask = _mask(_model())
    in_place, attached = _model(), _model()
    base = {k: v.clone() for k, v in in_place.state_dict().items()}
    opt_a = st.SparseAdamW(in_place, mask, lr=1e-2, weight_decay=0.0)
    handle = st.attach(attached, mask, name="task")
    opt_b = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(5):
        for model, opt in ((in_place, opt_a), (attached, opt_b)):
            opt.zero_grad()
            model(_ids(step)).square().mean().backward()
            opt.step()
    params = dict(in_place.named_parameters())
    delta = handle.to_delta()
    for name, values in handle.named_parameters():
        index = delta.entries[name].index
        moved = (params[name].detach() - base[name]).reshape(-1)[index]
        torch.testing.assert_close(values.detach(), moved, rtol=0, atol=1e-12)
    extracted = st.SparseDelta.extract(in_place, base, mask, strict=True)
    for name, e in extracted.entries.items():
        torch.testing.assert_close(e.tuned, delta.entries[name].tuned, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_is_exact_and_unmerge_restores_the_base_bit_for_bit(dtype):
    model = _model(dtype)
    before = _bytes(model)
    handle = st.attach(model, _mask(model), name="task")
    _randomize(handle, scale=0.05)
    ids = _ids()
    with torch.no_grad():
        attached_out = model(ids).float()
    delta = handle.to_delta()
    # the in-place reference: each selected entry written as theta0 + v, rounded once
    reference = _model(dtype)
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, values in handle.named_parameters():
            flat = ref_params[name].data.view(-1)
            index = delta.entries[name].index
            flat[index] = (flat[index].float() + values.float()).to(dtype)
    handle.merge()
    assert handle.merged
    assert _bytes(model) == _bytes(reference)
    applied = _model(dtype)
    delta.apply_to(applied)
    assert _bytes(model) == _bytes(applied)
    with torch.no_grad():
        merged_out = model(ids).float()  # the hook skips the merged delta
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged_out, attached_out, rtol=tol, atol=tol)
    with pytest.raises(st.InvalidArgumentError, match="already merged"):
        handle.merge()
    handle.unmerge()
    assert _bytes(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), attached_out, rtol=0, atol=0)


def test_remove_leaves_the_model_as_it_was():
    model = _model(torch.float32)
    model.emb.weight.requires_grad_(False)  # a flag of the user's own: kept
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, ids = _bytes(model), _ids()
    with torch.no_grad():
        out = model(ids)
    a = st.attach(model, _mask(model), name="a")
    b = st.attach(model, _mask(model, seed=5), name="b")
    _randomize(a)
    _randomize(b, seed=4)
    a.merge()
    b.remove()
    assert hasattr(model.fc, SLOT)
    a.remove()
    assert _bytes(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not hasattr(m, SLOT) and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids), out)
    with pytest.raises(st.InvalidArgumentError, match="removed"):
        list(a.parameters())


def test_several_deltas_hot_swap_and_sum():
    model, ids = _model(), _ids()
    with torch.no_grad():
        base_out = model(ids)
    a = st.attach(model, _mask(model), name="a")
    b = st.attach(model, _mask(model, seed=7), name="b")
    _randomize(a)
    _randomize(b, seed=8)
    outs = {}
    for name in ("a", "b"):
        dense = _model()
        (a if name == "a" else b).to_delta().apply_to(dense)
        outs[name] = dense(ids).detach()
    both = _model()
    merged = st.merge_deltas([a.to_delta(), b.to_delta()], policy="sum")
    merged.apply_to(both, check_base=False)
    outs["both"] = both(ids).detach()
    with torch.no_grad():
        assert a.active == ("a", "b")
        torch.testing.assert_close(model(ids), outs["both"], rtol=0, atol=1e-12)
        a.set_active("b")
        torch.testing.assert_close(model(ids), outs["b"], rtol=0, atol=1e-12)
        a.set_active(["a"])
        torch.testing.assert_close(model(ids), outs["a"], rtol=0, atol=1e-12)
        a.set_active([])
        assert torch.equal(model(ids), base_out)
    with pytest.raises(st.InvalidArgumentError, match="no delta named"):
        a.set_active("c")
    with pytest.raises(st.InvalidArgumentError, match="already attached"):
        st.attach(model, _mask(model), name="a")
    a.set_active(["a", "b"])
    a.merge()
    b.merge()
    with pytest.raises(st.InvalidArgumentError, match="unmerge"):
        a.unmerge()
    b.unmerge()
    a.unmerge()


def test_delta_files_round_trip_through_attach_to(tmp_path):
    model = _model(torch.float32)
    handle = st.attach(model, _mask(model), name="task")
    _randomize(handle, scale=0.05)
    delta = handle.to_delta()
    assert delta.base_fingerprint == st.delta.base_fingerprint(
        dict(_model(torch.float32).named_parameters()))
    path = delta.save(tmp_path / "task.safetensors")
    loaded = st.SparseDelta.load(path)
    fresh = _model(torch.float32)
    before = _bytes(fresh)
    again = loaded.attach_to(fresh, name="task")
    assert _bytes(fresh) == before
    for name, values in again.named_parameters():  # the file keeps theta, not v: v = theta - theta0
        assert torch.equal(values, loaded.entries[name].delta64().float())
    back = again.to_delta()  # ... and theta0 + (theta - theta0) rounds back to theta
    for name, e in delta.entries.items():
        assert torch.equal(back.entries[name].tuned, e.tuned)
        assert torch.equal(back.entries[name].base, e.base)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=1e-6, atol=1e-6)
    with pytest.raises(st.BaseModelMismatchError):
        loaded.attach_to(_model(torch.float32, seed=9), name="other")


def test_refuses_what_it_does_not_cover():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    mask = st.Mask.from_dict({n: torch.ones(p.shape, dtype=torch.bool)
                              for n, p in model.named_parameters()})
    with pytest.raises(st.ParameterMismatchError, match=r"1\.weight"):
        st.attach(model, mask)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(st.InvalidArgumentError, match="identifier"):
        st.attach(model, mask, name="a.b")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_base_trains_fp32_values(dtype):
    model = _model(dtype)
    before = _bytes(model)
    handle = st.attach(model, _mask(model), name="task")
    opt = torch.optim.AdamW(handle.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(_ids()).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in handle.parameters())
    assert _bytes(model) == before


def test_merged_weight_values_rounds_once():
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    v = torch.tensor([2**-9, 2**-7 + 2**-9], dtype=torch.float32)
    assert torch.equal(merged_weight_values(base, v), (base.float() + v).to(torch.bfloat16))


HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _quantize(model: nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())


def _train(model: nn.Module, handle, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """10 AdamW steps of the attached values on a squared error; the losses."""
    opt = torch.optim.AdamW(handle.parameters(), lr=3e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_torchao_int8_base_trains_and_refuses_merge():
    assert HAS_TORCHAO, "torchao is a test dependency (the quant extra): run `make install`"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    _quantize(model)
    mask = st.Mask.from_dict({n: torch.rand(p.shape) < 0.2 for n, p in model.named_parameters()})
    stored = [(p.qdata.clone(), p.scale.clone()) for p in (model[0].weight, model[2].weight)]
    handle = st.attach(model, mask, name="task")
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    losses = _train(model, handle, x, y)
    assert losses[-1] < losses[0]
    for (q, s), p in zip(stored, (model[0].weight, model[2].weight), strict=True):
        assert torch.equal(p.qdata, q) and torch.equal(p.scale, s)
    with pytest.raises(st.InvalidArgumentError, match="quantized"):
        handle.merge()


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _quantize_nf4(module: nn.Module) -> None:
    """Every nn.Linear under ``module`` -> a bitsandbytes 4-bit NF4 Linear4bit (fp32 compute),
    quantized on the CPU."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.load_state_dict(child.state_dict())
            setattr(module, name, q.to(child.weight.device))  # .to() quantizes
        else:
            _quantize_nf4(child)


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bitsandbytes_4bit_base_trains_keeps_its_bytes_and_refuses_merge():
    assert HAS_BNB, "bitsandbytes is a test dependency (the quant extra): run `make install`"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    bits = {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in model.named_parameters()}
    mask = st.Mask.from_dict(bits)  # selected on the float model, attached to the 4-bit one
    _quantize_nf4(model)
    assert model[0].weight.dtype == torch.uint8 and model[0].weight.shape != (32, 16)
    stored = _stored(model)
    handle = st.attach(model, mask, name="task")
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
    with torch.no_grad():  # the delta's forward: base(x) + x S^T, S at the mask's entries
        before = model(x)
        for p in handle.parameters():
            p.fill_(0.5)
        dense = [torch.zeros(32, 16), torch.zeros(4, 32)]
        for d, w in zip(dense, ("0.weight", "2.weight"), strict=True):
            d[bits[w]] = 0.5
        h = torch.tanh(model[0](x))
        torch.testing.assert_close(h, torch.tanh(
            nn.functional.linear(x, _dequantized(model[0]), model[0].bias) + x @ dense[0].t()
            + 0.5 * bits["0.bias"]))
        for p in handle.parameters():
            p.zero_()
        torch.testing.assert_close(model(x), before)
    losses = _train(model, handle, x, y)
    assert losses[-1] < losses[0]
    assert all(torch.equal(stored[n], p) for n, p in _stored(model).items() if n in stored)
    with pytest.raises(st.InvalidArgumentError, match="quantized"):
        handle.merge()
    with pytest.raises(st.InvalidArgumentError, match="Params4bit: keep the delta attached"):
        handle.merge(requantize=True)
    handle.remove()
    assert all(torch.equal(stored[n], p) for n, p in _stored(model).items())


def _dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@pytest.mark.parametrize("quantized", [None, "torchao_int8", "bnb_nf4"])
def test_loss_falls_on_rotten_tomatoes_with_minilm(quantized):
    assert HAS_TORCHAO or quantized != "torchao_int8", "torchao is a test dependency"
    assert HAS_BNB or quantized != "bnb_nf4", "bitsandbytes is a test dependency"
    from sparsetune.data import batches, load_pretrained, load_task

    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(None, num_labels=2, seed=0)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())  # the mask is drawn on the float model
    bits = {n: torch.rand(p.shape, generator=g) < 0.005 for n, p in params.items()
            if n.endswith("weight") and p.dim() == 2 and n.startswith("bert.encoder")}
    if quantized == "torchao_int8":
        _quantize(model.bert)
    elif quantized == "bnb_nf4":
        _quantize_nf4(model.bert)
    task = load_task("rotten_tomatoes", max_examples=160, seed=0)
    stored = _stored(model.bert)
    bits.update({n: torch.ones(params[n].shape, dtype=torch.bool)
                 for n in ("classifier.weight", "classifier.bias")})
    handle = st.attach(model, st.Mask.from_dict(bits), name="rt")
    opt = torch.optim.AdamW(handle.parameters(), lr=5e-3)
    data = list(batches(task.train, tokenizer, batch_size=16, max_length=32, shuffle=True))
    model.train()
    losses = []
    for _ in range(2):
        for batch in data[:3]:
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3  # the same 3 batches, twice
    assert last < first, losses
    after = _stored(model.bert)
    assert all(_same_bytes(stored[n], after[n]) for n in stored)  # the base is never written
    print(f"MiniLM attach (quantized={quantized}): {len(losses)} steps, losses {losses}, "
          f"{time.perf_counter() - start:.1f} s")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal stored contents, for plain and torchao tensors alike."""
    if hasattr(a, "qdata"):
        return torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    return torch.equal(a, b)
