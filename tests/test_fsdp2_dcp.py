"""DCP checkpoints of SparseAdamW / SparseSGD on FSDP2, resharded: 2 -> 4 and 4 -> 2 gloo ranks.

Ranks train the sharded tiny MLP for 3 steps and save model and optimizer with
``torch.distributed.checkpoint``; another world size loads both and trains 3 more steps. The
gathered parameters must equal one process training 6 steps without interruption (float64,
1e-12), for every optimizer (AdamW, AdamW decaying to theta0, SGD with momentum).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import batch, init, make_model, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

STEPS = 3
OPTIMIZERS = {
    "adamw": (st.SparseAdamW, dict(lr=0.05, weight_decay=0.1)),
    "adamw_init": (st.SparseAdamW, dict(lr=0.05, weight_decay=0.1, decay_to="init",
                                        amsgrad=True)),
    "sgd": (st.SparseSGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
}


def make_mask(model: nn.Module, seed: int = 3) -> st.Mask:
    return st.select(model, "random", 0.4, seed=seed, always_train=["4.bias"], progress=False)


def train(model: nn.Module, opt, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows(rank, world)]), y[rows(rank, world)]).backward()
        opt.step()


def _worker(rank: int, world: int, folder: str, load_from: str | None, save_to: str | None
            ) -> None:
    import torch.distributed.checkpoint as dcp

    from sparsetune.integrations.fsdp_checkpoint import (
        load_sharded_optimizer_state,
        sharded_optimizer_state,
    )

    mesh = init(rank, world, folder)
    out: dict = {}
    saving: dict = {}
    for key, (cls, hyper) in OPTIMIZERS.items():
        model = shard(make_model(), mesh)
        opt = cls(model, make_mask(make_model()), **hyper)
        if load_from is not None:
            state = {f"model_{key}": model.state_dict()}
            dcp.load(state, checkpoint_id=load_from)
            model.load_state_dict(state[f"model_{key}"])
            load_sharded_optimizer_state(opt, load_from, key=f"optim_{key}")
            train(model, opt, range(STEPS, 2 * STEPS), rank, world)
            out[key] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        if save_to is not None:
            if load_from is not None:  # a fresh run to save from
                model = shard(make_model(), mesh)
                opt = cls(model, make_mask(make_model()), **hyper)
            train(model, opt, range(STEPS), rank, world)
            saving[f"model_{key}"] = model.state_dict()
            saving[f"optim_{key}"] = sharded_optimizer_state(opt)
    if save_to is not None:
        dcp.save(saving, checkpoint_id=save_to)
    if load_from is not None:  # bad input: another mask, a key that holds no such state
        model = shard(make_model(), mesh)
        other = st.SparseAdamW(model, make_mask(make_model(), seed=4), lr=0.05)
        out["other_mask"] = outcome(
            lambda: load_sharded_optimizer_state(other, load_from, key="optim_adamw"))
        out["wrong_key"] = outcome(
            lambda: load_sharded_optimizer_state(other, load_from, key="model_adamw"))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2_dcp")


@pytest.fixture(scope="module")
def two_to_four(root) -> list[dict]:
    """Save on 2 ranks; load on 4 and continue (and save a fresh 4-rank run)."""
    for name in ("two", "four"):
        (root / name).mkdir()
    run_ranks(_worker, 2, root / "two", None, str(root / "ckpt2"))
    return run_ranks(_worker, 4, root / "four", str(root / "ckpt2"), str(root / "ckpt4"))


@pytest.fixture(scope="module")
def four_to_two(root, two_to_four) -> list[dict]:
    """Load the 4-rank checkpoint on 2 ranks and continue."""
    (root / "back").mkdir()
    return run_ranks(_worker, 2, root / "back", str(root / "ckpt4"), None)


def _check_resumed(outs: list[dict], key: str) -> None:
    cls, hyper = OPTIMIZERS[key]
    model = make_model()
    base = make_model()
    mask = make_mask(base)
    train(model, cls(model, mask, **hyper), range(2 * STEPS))
    for out in outs:
        for name, p in model.named_parameters():
            torch.testing.assert_close(out[key][name], p.detach(), rtol=0, atol=1e-12)
            frozen = ~mask[name]
            assert torch.equal(out[key][name][frozen], base.get_parameter(name)[frozen])
        assert not torch.equal(out[key]["0.weight"], base[0].weight)


@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_saved_on_2_ranks_resumed_on_4_equals_uninterrupted_one_process(two_to_four, key):
    _check_resumed(two_to_four, key)


@pytest.mark.slow  # one more spawn of 2 ranks (about 10 s)
@pytest.mark.parametrize("key", list(OPTIMIZERS))
def test_saved_on_4_ranks_resumed_on_2_equals_uninterrupted_one_process(four_to_two, key):
    _check_resumed(four_to_two, key)


def test_bad_checkpoints_raise_on_every_rank(two_to_four):
    for out in two_to_four:
        assert out["other_mask"].startswith("StateMismatchError: SparseAdamW.load_state_dict: "
                                            "the state was saved with mask digest"), out
        assert out["wrong_key"].startswith("InvalidArgumentError: checkpoint key 'model_adamw' "
                                           "holds no sparsetune sharded optimizer state"), out
