"""Compact optimizers freeze the parameters their mask selects nothing of (issue 23).

A mask on q_proj/v_proj of a tiny Llama: SparseAdamW / SparseSGD turn ``requires_grad`` off for
every other tensor, so the backward builds no gradient for them, and the training is the same as
with ``freeze_unselected=False`` (float64, bit for bit). A later optimizer whose mask selects a
frozen tensor thaws it; tensors the caller froze are never touched.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sparsetune as st
from sparsetune.errors import InvalidArgumentError
from sparsetune.optim.freezing import frozen_by_optimizer

transformers = pytest.importorskip("transformers")


def _model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def _qv_mask(model: torch.nn.Module, density: float = 0.2) -> st.Mask:
    g = torch.Generator().manual_seed(1)
    return st.Mask.from_dict({
        n: (torch.rand(p.shape, generator=g) < density) if n.endswith(("q_proj.weight",
                                                                       "v_proj.weight"))
        else torch.zeros(p.shape, dtype=torch.bool)
        for n, p in model.named_parameters()})


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_unselected_parameters_get_no_gradient_and_training_is_unchanged(optimizer):
    make = {"adamw": lambda m, mask, **kw: st.SparseAdamW(m, mask, lr=1e-2, **kw),
            "sgd": lambda m, mask, **kw: st.SparseSGD(m, mask, lr=1e-1, momentum=0.9, **kw)}
    base = _model()
    mask = _qv_mask(base)
    runs = {}
    for freeze in (True, False):
        model = copy.deepcopy(base)
        opt = make[optimizer](model, mask, freeze_unselected=freeze)
        for _ in range(3):
            model(**_batch()).loss.backward()
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
        runs[freeze] = model, opt, with_grad
    selected = {n for n in mask if mask.count(n) > 0}
    everything = {n for n, _ in base.named_parameters()}
    frozen_model, frozen_opt, frozen_grads = runs[True]
    assert frozen_grads == selected  # no dense gradient for the other tensors
    assert runs[False][2] == everything
    assert set(frozen_opt.frozen_parameters) == everything - selected
    assert runs[False][1].frozen_parameters == ()
    for (name, p), q in zip(frozen_model.named_parameters(), runs[False][0].parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad == (name in selected)
        assert frozen_by_optimizer(p) == (name not in selected)
    assert all(p.requires_grad for p in runs[False][0].parameters())


def test_a_later_mask_thaws_what_an_optimizer_froze_but_never_what_the_caller_froze():
    model = _model()
    gate = "model.layers.0.mlp.gate_proj.weight"
    caller_frozen = "model.layers.1.mlp.up_proj.weight"
    params = dict(model.named_parameters())
    params[caller_frozen].requires_grad_(False)  # the caller's own freeze
    st.SparseAdamW(model, _qv_mask(model), lr=1e-3)
    assert not params[gate].requires_grad and frozen_by_optimizer(params[gate])
    assert not frozen_by_optimizer(params[caller_frozen])
    bits = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
    bits[gate][0, 0] = True
    bits[caller_frozen][0, 0] = True
    second = st.Mask.from_dict(bits)
    opt = st.SparseAdamW(model, second, lr=1e-3)
    assert params[gate].requires_grad and not frozen_by_optimizer(params[gate])
    assert not params[caller_frozen].requires_grad  # not the optimizer's to thaw
    assert gate not in opt.frozen_parameters
    before = params[gate].detach().clone()
    model(**_batch()).loss.backward()
    opt.step()
    moved = (params[gate].detach() != before)
    assert moved[0, 0] and int(moved.sum()) == 1


def test_an_empty_mask_freezes_nothing_and_the_flag_is_checked():
    model = _model()
    empty = st.Mask.from_dict({n: torch.zeros(p.shape, dtype=torch.bool)
                               for n, p in model.named_parameters()})
    opt = st.SparseSGD(model, empty, lr=1e-3)
    assert opt.frozen_parameters == () and all(p.requires_grad for p in model.parameters())
    model(**_batch()).loss.backward()  # still has a gradient path
    with pytest.raises(InvalidArgumentError, match="freeze_unselected must be True, False or None"):
        st.SparseAdamW(model, empty, freeze_unselected="yes")


def test_ddp_automatic_choice_keeps_flags_and_true_before_wrapping_works(tmp_path):
    """Under a process group with plain parameters (DDP) the default freezes nothing, since DDP
    fixed its parameters at wrapping; freeze_unselected=True before wrapping works too."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        for freeze in (None, True):
            model = _model()
            mask = _qv_mask(model)
            if freeze is None:  # the README order: wrap, then build the optimizer
                ddp = DistributedDataParallel(model)
                opt = st.SparseAdamW(ddp.module, mask, lr=1e-2)
                assert opt.frozen_parameters == ()
            else:  # freeze first, then wrap: DDP reduces only what requires grad
                opt = st.SparseAdamW(model, mask, lr=1e-2, freeze_unselected=True)
                assert opt.frozen_parameters
                ddp = DistributedDataParallel(model)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            for _ in range(2):
                ddp(**_batch()).loss.backward()
                opt.step()
                opt.zero_grad()
            for name, p in model.named_parameters():
                moved = p.detach() != before[name]
                assert not (moved & ~mask[name]).any(), name
                assert bool(moved.any()) == (mask.count(name) > 0), name
    finally:
        dist.destroy_process_group()
