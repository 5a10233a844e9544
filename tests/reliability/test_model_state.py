"""Model state that selection and deltas must not ignore (issue 20): buffers, modes, flags, grads.

Every selection method leaves the model exactly as it found it: every parameter and buffer bit
for bit (BatchNorm's running statistics and batch counter included), every module's train/eval
mode, every ``requires_grad`` flag and every ``.grad``. A delta of a BatchNorm model records the
buffers that changed, so applying it to a fresh base rebuilds the tuned model exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune import SparseDelta
from sparsetune.select import METHODS, method_spec

HEAD = ["head.weight", "head.bias"]


class BatchNormCNN(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> pool -> Dropout -> Linear head; input (n, 2, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.drop(y))


def _cnn(seed: int = 0) -> BatchNormCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BatchNormCNN().double()


def _cnn_data(n: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 2, 6, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (5,), generator=gen)) for _ in range(n)]


def _cnn_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        attn_implementation="eager")  # Hessian-vector products (sam_curvature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForSequenceClassification(config)


def _bert_data(n: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (4, 8), generator=gen),
             "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=gen)} for _ in range(n)]


# Options that make each data-driven method run its training steps (a few, to stay fast).
OPTIONS = {
    "magnitude": {"burn_in_steps": 2},
    "child_pruning": {"num_batches": 2},
    "lt_sft": {"steps": 2},
    "diff_pruning": {"steps": 2},
    "sam": {"head_warmup_steps": 2, "num_batches": 2},
    "sam_curvature": {"head_warmup_steps": 2, "num_batches": 2, "num_samples": 1},
    "names": {"include": r"weight$"},
}


def _snapshot(model: nn.Module) -> dict:
    """Everything selection must leave alone, cloned."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "all_buffers": {k: v.clone() for k, v in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and every byte."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def _assert_unchanged(before: dict, after: dict) -> None:
    for key in ("state", "all_buffers"):
        assert before[key].keys() == after[key].keys()
        moved = [k for k in before[key] if not _same(before[key][k], after[key][k])]
        assert not moved, f"{key} changed: {moved}"
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    for name, grad in before["grads"].items():
        now = after["grads"][name]
        assert (grad is None) == (now is None), name
        assert grad is None or _same(grad, now), name


def _prepare(model: nn.Module, frozen: str, with_grad: str) -> None:
    """A model as a user may hand it over: mixed modes, a frozen parameter, a stale .grad
    (parameters named by suffix, so that peft's prefixed names match too)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # a mode that differs from its parent's must survive too
    named = dict(model.named_parameters())
    plain = {n.replace(".base_layer", ""): n for n in named}
    [frozen] = [n for p, n in plain.items() if p.endswith(frozen)]
    [with_grad] = [n for p, n in plain.items() if p.endswith(with_grad)]
    named[frozen].requires_grad_(False)
    named[with_grad].grad = torch.full_like(named[with_grad], 0.25)


PEFT_METHODS = ("lora", "adapter")  # registered by sparsetune.integrations.peft


def _for_method(model: nn.Module, method: str, targets: list[str]) -> nn.Module:
    """The model itself, or for the peft methods the model with LoRA layers on ``targets``."""
    if method not in PEFT_METHODS:
        return model
    peft = pytest.importorskip("peft")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))


def _select(model, method, data, loss_fn, head):
    spec = method_spec(method)
    density = 0.2 if spec.uses_density else None
    kwargs = dict(OPTIONS.get(method, {}))
    if spec.optimizer is not None:  # per-step methods: refused, the model untouched
        with pytest.raises(st.InvalidArgumentError):
            st.select(model, method, density, data=data, loss_fn=loss_fn)
        return
    head = [] if method in PEFT_METHODS else head
    st.select(model, method, density, data=data, loss_fn=loss_fn, always_train=head, seed=3,
              **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_selection_leaves_a_batchnorm_cnn_exactly_as_found(method):
    model = _for_method(_cnn(), method, ["conv", "head"])
    _prepare(model, frozen="conv.bias", with_grad="bn.weight")
    before = _snapshot(model)
    _select(model, method, _cnn_data(), _cnn_loss, HEAD)
    _assert_unchanged(before, _snapshot(model))


@pytest.mark.parametrize("method", list(METHODS))
def test_selection_leaves_a_transformer_exactly_as_found(method):
    model = _for_method(_bert(), method, ["query", "value"])
    _prepare(model, frozen="embeddings.word_embeddings.weight", with_grad="pooler.dense.bias")
    before = _snapshot(model)
    _select(model, method, _bert_data(), None, ["classifier.weight", "classifier.bias"])
    _assert_unchanged(before, _snapshot(model))


def test_restoring_puts_back_buffers_reassigned_or_changed_in_place():
    from sparsetune._loss import restoring

    model = _cnn()
    before = _snapshot(model)
    with restoring(model):
        model.bn.running_mean.add_(1.0)
        model.bn.running_var = torch.zeros(4, dtype=torch.float64)  # a new tensor object
        model.bn.num_batches_tracked += 5
        model.head.weight.requires_grad_(False)
        model.eval()
    _assert_unchanged(before, _snapshot(model))


# -- deltas of models with buffers -------------------------------------------------------------
def _tuned_cnn(base: nn.Module, steps: int = 3):
    """A copy of ``base`` fine-tuned in train mode on the mask (BN statistics move)."""
    mask = st.select(base, "random", 0.3, seed=2, always_train=HEAD)
    tuned = copy.deepcopy(base).train()
    opt = st.SparseAdamW(tuned, mask, lr=0.05)
    for batch in _cnn_data(steps, seed=7):
        opt.zero_grad()
        _cnn_loss(tuned, batch).backward()
        opt.step()
    return tuned.eval(), mask


def _state_equal(a: nn.Module, b: nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not _same(sa[k], sb[k])]


def test_batchnorm_delta_rebuilds_the_tuned_model_exactly_through_a_file(tmp_path):
    base = _cnn()
    tuned, mask = _tuned_cnn(base)
    assert _state_equal(base, tuned)  # the running statistics moved
    delta = SparseDelta.extract(tuned, base.state_dict(), mask, method="random")
    assert set(delta.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    loaded = SparseDelta.load(delta.save(tmp_path / "bn.safetensors"))
    assert set(loaded.buffers) == set(delta.buffers)
    rebuilt = loaded.apply_to(_cnn())
    assert _state_equal(rebuilt, tuned) == []
    loaded.revert_from(rebuilt)
    assert _state_equal(rebuilt, base) == []
    assert "3 buffers" in loaded.summary()


def test_strict_extract_notices_a_buffer_the_base_state_lacks():
    base = _cnn()
    tuned, mask = _tuned_cnn(base)
    params_only = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(st.ParameterMismatchError, match=r"bn\.running_mean"):
        SparseDelta.extract(tuned, params_only, mask)
    loose = SparseDelta.extract(tuned, params_only, mask, strict=False)
    assert not loose.buffers  # not comparable, so not recorded (strict=False says so)
    state = base.state_dict()
    del state["bn.running_var"]
    with pytest.raises(st.ParameterMismatchError, match=r"bn\.running_var"):
        SparseDelta.extract(tuned, state, mask)


def test_a_batchnorm_delta_checks_the_buffers_of_the_model_it_is_applied_to():
    base = _cnn()
    tuned, mask = _tuned_cnn(base)
    delta = SparseDelta.extract(tuned, base.state_dict(), mask)
    target = _cnn()
    del target.bn.running_mean  # a BN layer that keeps no running mean
    target.bn.register_buffer("running_mean", None)
    before = _snapshot(target)
    lacks = r"buffers the model lacks \['bn\.running_mean'\]"
    with pytest.raises(st.ParameterMismatchError, match=lacks):
        delta.apply_to(target)
    _assert_unchanged(before, _snapshot(target))  # nothing was written
    rebuilt = delta.apply_to(_cnn())
    rebuilt.bn.running_var.fill_(1.0)  # the tuned weights, but not the tuned statistics
    before = _snapshot(rebuilt)
    with pytest.raises(st.BaseModelMismatchError, match=r"bn\.running_var \(buffer, 4 entries\)"):
        delta.revert_from(rebuilt)
    _assert_unchanged(before, _snapshot(rebuilt))


def test_transformer_delta_without_changed_buffers_writes_todays_format(tmp_path):
    from safetensors import safe_open

    base = _bert()
    mask = st.select(base, "random", 0.05, seed=1)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            p[mask[name]] += 0.5
    delta = SparseDelta.extract(tuned, base.state_dict(), mask)
    assert not delta.buffers
    path = delta.save(tmp_path / "bert.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert "buffers" not in metadata
    assert {k.split(":")[0] for k in keys} == {"base", "tuned", "idx"}
    rebuilt = SparseDelta.load(path).apply_to(_bert())
    assert _state_equal(rebuilt, tuned) == []


def test_the_trainer_callback_delta_of_a_batchnorm_model_rebuilds_it_exactly():
    """SparseTuningCallback snapshots the buffers at the start: its delta carries the moved BN
    statistics (a parameters-only theta0 would be refused by the strict extract)."""
    pytest.importorskip("transformers")
    from sparsetune.integrations.transformers import SparseTuningCallback

    base = _cnn()
    mask = st.select(base, "random", 0.3, seed=2, always_train=HEAD)
    model = copy.deepcopy(base)
    callback = SparseTuningCallback(model, mask, method="random")
    model.train()
    opt = st.SparseAdamW(model, mask, lr=0.05)
    for batch in _cnn_data(3, seed=7):
        opt.zero_grad()
        _cnn_loss(model, batch).backward()
        opt.step()
    delta = callback.delta(model.eval())
    assert set(delta.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert _state_equal(delta.apply_to(_cnn()), model) == []
