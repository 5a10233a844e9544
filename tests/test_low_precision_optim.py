"""bf16/fp16 parameters: fp32 master values of the selected entries (issue 21).

References: torch.optim.AdamW / SGD run in fp32 on an fp32 copy of the selected values, fed
the same gradients cast to fp32 (the masters must equal them); torch.optim.AdamW in bf16 for
``master_weights=False`` (today's behaviour, bit-identical); a fresh optimizer loaded with
the same state for external writes and state-dict round trips.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sparsetune import Mask, SparseAdamW, SparseSGD
from sparsetune.errors import InvalidArgumentError

transformers = pytest.importorskip("transformers")

STEPS = 20


def tiny_llama(device, dtype=torch.bfloat16, seed=0):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def random_mask(model, density=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return Mask.from_dict(
        {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()}
    )


def token_batch(device, seed=2):
    # every token id appears, so every embedding row gets a gradient
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(128, generator=gen), torch.randint(0, 128, (128,), generator=gen)]
    return torch.cat(ids).view(8, 32).to(device)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def selected(model, mask, of_grad=False):
    out = {}
    for n, p in model.named_parameters():
        t = p.grad if of_grad else p.detach()
        out[n] = t.reshape(-1)[mask[n].reshape(-1).to(t.device)]
    return out


def train_against_reference(model, mask, opt, ref_cls, ref_hyper, ids):
    """Train ``STEPS`` steps; after each, check rounding, frozen entries and the fp32 reference."""
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {n: v.float().clone().requires_grad_(True) for n, v in selected(model, mask).items()}
    ref_opt = ref_cls([refs[n] for n in names], **ref_hyper, foreach=False)
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, g in selected(model, mask, of_grad=True).items():
            refs[n].grad = g.float()
        opt.step()
        ref_opt.step()
        for n, p in model.named_parameters():
            sel = mask[n].to(p.device)
            assert torch.equal(p.detach()[~sel], before[n][~sel]), f"{n}: frozen entry moved"
            master = opt.state[p]["master"]
            assert master.dtype == torch.float32
            assert torch.equal(p.detach()[sel], master.to(p.dtype)), f"{n}: not master rounded"
            torch.testing.assert_close(master, refs[n].detach(), rtol=1e-6, atol=1e-12)
    changed = sum(int((p.detach() != before[n])[mask[n].to(p.device)].sum())
                  for n, p in model.named_parameters())
    return changed / mask.num_selected


@pytest.mark.parametrize("impl", SparseAdamW.impls)
def test_bf16_llama_adamw_masters_learn_every_selected_entry(impl, device):
    model = tiny_llama(device)
    mask = random_mask(model)
    opt = SparseAdamW(model, mask, lr=1e-5, impl=impl)
    fraction = train_against_reference(
        model, mask, opt, torch.optim.AdamW, dict(lr=1e-5, weight_decay=1e-2), token_batch(device)
    )
    assert fraction >= 0.99, fraction  # without masters: about 0.16


@pytest.mark.parametrize("impl", SparseSGD.impls)
def test_bf16_llama_sgd_momentum_masters_match_fp32_sgd(impl, device):
    model = tiny_llama(device)
    mask = random_mask(model)
    hyper = dict(lr=5e-3, momentum=0.9, weight_decay=1e-2)
    opt = SparseSGD(model, mask, **hyper, impl=impl)
    ids = token_batch(device)
    fraction = train_against_reference(model, mask, opt, torch.optim.SGD, hyper, ids)
    assert fraction >= 0.9, fraction  # without masters: about 0.44


@pytest.mark.parametrize("impl", SparseAdamW.impls)
def test_master_weights_false_is_adamw_in_bf16_bit_for_bit(impl, device):
    """Today's behaviour: moments and update in the parameter's own dtype."""
    model = tiny_llama(device)
    mask = random_mask(model)
    ids = token_batch(device)
    opt = SparseAdamW(model, mask, lr=1e-4, impl=impl, master_weights=False)
    names = [n for n, _ in model.named_parameters()]
    refs = {n: v.clone().requires_grad_(True) for n, v in selected(model, mask).items()}
    ref_opt = torch.optim.AdamW([refs[n] for n in names], lr=1e-4, foreach=False)
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, g in selected(model, mask, of_grad=True).items():
            refs[n].grad = g.clone()
        opt.step()
        ref_opt.step()
    now = selected(model, mask)
    for n, p in model.named_parameters():
        assert "master" not in opt.state[p]
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(now[n], refs[n].detach()), n


def _steps(model, opt, ids, count):
    for _ in range(count):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


@pytest.mark.parametrize("cls", [SparseAdamW, SparseSGD])
def test_state_dict_round_trip_carries_fp32_masters(cls, device):
    model = tiny_llama(device)
    mask = random_mask(model)
    ids = token_batch(device)
    hyper = dict(lr=1e-4) if cls is SparseAdamW else dict(lr=0.05, momentum=0.9)
    opt = cls(model, mask, **hyper)
    _steps(model, opt, ids, 3)
    saved = roundtrip(opt.state_dict())
    twin = copy.deepcopy(model)
    fresh = cls(twin, mask, **hyper)
    fresh.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert fresh.state[q][key].dtype == torch.float32, key
                assert torch.equal(fresh.state[q][key], value), key
    _steps(model, opt, ids, 2)
    _steps(twin, fresh, ids, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], fresh.state[q]["master"])


def test_fp32_state_loads_into_a_bf16_model(device):
    """A state saved by an fp32 run (no masters): moments kept in fp32, masters from params."""
    model32 = tiny_llama(device, dtype=torch.float32)
    mask = random_mask(model32)
    ids = token_batch(device)
    opt32 = SparseAdamW(model32, mask, lr=1e-4)
    _steps(model32, opt32, ids, 3)
    saved = roundtrip(opt32.state_dict())
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    rounded = copy.deepcopy(model16).to(torch.float32)  # an fp32 twin holding the same values
    opt16, twin = SparseAdamW(model16, mask, lr=1e-4), SparseAdamW(rounded, mask, lr=1e-4)
    opt16.load_state_dict(saved)
    twin.load_state_dict(roundtrip(saved))
    for p, q in zip(model32.parameters(), model16.parameters()):
        assert torch.equal(opt16.state[q]["exp_avg_sq"], opt32.state[p]["exp_avg_sq"])
    gen = torch.Generator().manual_seed(5)
    for p, q in zip(model16.parameters(), rounded.parameters()):
        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=torch.bfloat16)
        q.grad = p.grad.float()
    opt16.step()
    twin.step()
    for (n, p), q in zip(model16.named_parameters(), rounded.parameters()):
        sel = mask[n].reshape(-1).to(device)
        assert torch.equal(opt16.state[p]["master"], q.detach().reshape(-1)[sel]), n
        assert torch.equal(p.detach(), q.detach().to(torch.bfloat16)), n


@pytest.mark.parametrize("impl", SparseAdamW.impls)
def test_external_write_resyncs_only_the_written_masters(impl, device):
    model = tiny_llama(device)
    mask = random_mask(model)
    ids = token_batch(device)
    opt = SparseAdamW(model, mask, lr=1e-5, impl=impl)
    _steps(model, opt, ids, 3)
    weight = model.model.layers[0].mlp.up_proj.weight
    masters = {p: opt.state[p]["master"].clone() for p in model.parameters()}
    weight.data[0].add_(1.0)  # a write the optimizer cannot see coming
    twin = copy.deepcopy(model)
    fresh = SparseAdamW(twin, mask, lr=1e-5, impl=impl)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    _steps(model, opt, ids, 1)
    _steps(twin, fresh, ids, 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], fresh.state[q]["master"])
    name = "model.layers.0.mlp.up_proj.weight"
    sel = mask[name].to(device)
    row0 = sel.clone()
    row0[1:] = False
    written = row0.reshape(-1)[sel.reshape(-1)]
    moved = (opt.state[weight]["master"] - masters[weight]).abs()
    assert float(moved[written].min()) > 0.5  # re-synced from the written parameter
    assert float(moved[~written].max()) < 1e-3  # the rest kept their fp32 masters


def test_fp16_grad_scaler_skipped_step_changes_nothing(device, make_mlp, make_mask):
    model = make_mlp(seed=7, dtype=torch.float16).to(device)
    mask = make_mask(model, density=0.5, seed=8)
    opt = SparseAdamW(model, mask, lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=gen).to(device=device, dtype=torch.float16)

    def scaled_backward():
        opt.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()

    scaled_backward()
    scaler.step(opt)
    scaler.update()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    snapshot = roundtrip(({n: p.detach().clone() for n, p in model.named_parameters()},
                          opt.state_dict()))
    scaled_backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9, "the scaler saw the inf"
    params, state = roundtrip(({n: p.detach().clone() for n, p in model.named_parameters()},
                               opt.state_dict()))
    for n in params:
        assert torch.equal(params[n], snapshot[0][n]), n
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            expected = snapshot[1]["state"][pid][key]
            assert torch.equal(value, expected) if torch.is_tensor(value) else value == expected
    # the next finite step runs, on gradients divided by the scale in fp32
    scaled_backward()
    grads = {p: p.grad.float() / scaler.get_scale() for p in model.parameters()}
    exp_avg = {p: opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    scaler.step(opt)
    for n, p in model.named_parameters():
        g = grads[p].reshape(-1)[mask[n].reshape(-1).to(device)]
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * exp_avg[p] + 0.1 * g)
        assert opt.state[p]["step"] == 2


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_master_weights_is_checked(bad, make_mlp, make_mask):
    model = make_mlp()
    with pytest.raises(InvalidArgumentError, match="master_weights"):
        SparseAdamW(model, make_mask(model), master_weights=bad)
