"""torch.distributed on CPU: two gloo processes (torch.multiprocessing.spawn, file store).

One spawn runs every distributed step (masks from all-reduced statistics, broadcast, DDP
training with SparseAdamW, FSDP2's sharded parameters) and saves what each rank saw; the tests
compare it with a single process on the concatenated batches, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsetune as st
from sparsetune.integrations.distributed import (
    all_reduce_scores,
    assert_same_mask,
    broadcast_mask,
    reject_sharded_parameters,
    select_distributed,
)
from sparsetune.select import accumulated_gradient

WORLD = 2
STEPS = 3
DENSITY = 0.3
HEAD = ["2.bias"]
HYPER = dict(lr=0.05, weight_decay=0.1)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def selection_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four batches: rank r scores batches r and r + 2; one process scores all four."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=gen, dtype=torch.float64),
             torch.randn(5, 3, generator=gen, dtype=torch.float64)) for _ in range(4)]


def training_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: 8 examples, rank r takes rows 4r .. 4r + 3."""
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randn(8, 3, generator=gen, dtype=torch.float64))


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    out: dict = {}
    model = make_model()
    mine = selection_batches()[rank::world]

    # Masks from all-reduced statistics, and the statistic itself.
    out["sam"] = select_distributed(model, "sam", DENSITY, data=mine, loss_fn=loss_fn,
                                    always_train=HEAD)
    out["child_pruning"] = select_distributed(model, "child_pruning", DENSITY, data=mine,
                                              loss_fn=loss_fn, max_grad_norm=None)
    out["gradient"] = all_reduce_scores(accumulated_gradient(model, loss_fn, mine))
    # Selected on rank 0 and broadcast: a seed that differs per rank would give other masks.
    out["random"] = select_distributed(model, "random", DENSITY, seed=7)
    own = st.select(model, "random", DENSITY, seed=rank)
    out["broadcast"] = broadcast_mask(own if rank == 0 else None)
    out["broadcast_check"] = _outcome(lambda: broadcast_mask(own))
    out["different_masks"] = _outcome(lambda: assert_same_mask(own))
    out["failed_selection"] = _outcome(lambda: select_distributed(model, "random", 2.0))

    # DDP training with SparseAdamW on the SAM mask.
    mask = out["sam"]
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = st.SparseAdamW(ddp.module, mask, **HYPER)
    for step in range(STEPS):
        x, y = training_batch(step)
        rows = slice(4 * rank, 4 * rank + 4)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        opt.step()
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["state_entries"] = sum(s["exp_avg"].numel() for s in opt.state.values())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out["ranks_bit_identical"] = all(torch.equal(g, gathered[0]) for g in gathered)

    # FSDP2: parameters become DTensor shards.
    from torch.distributed.fsdp import fully_shard

    sharded = make_model()
    fully_shard(sharded)
    out["fsdp_check"] = _outcome(lambda: reject_sharded_parameters(sharded, "SparseAdamW"))
    out["fsdp_ddp_check"] = _outcome(lambda: reject_sharded_parameters(make_model()))

    def fsdp_step(kind: str) -> None:
        if kind == "sparse":
            optimizer = st.SparseAdamW(sharded, mask, **HYPER)
        else:
            optimizer = st.MaskedOptimizer(torch.optim.AdamW(sharded.parameters()), mask, sharded)
        x, y = training_batch(0)
        nn.functional.mse_loss(sharded(x), y).backward()
        optimizer.step()

    out["fsdp_sparse_adamw"] = _outcome(lambda: fsdp_step("sparse"))
    out["fsdp_masked"] = _outcome(lambda: fsdp_step("masked"))
    torch.save({k: (dict(v) if isinstance(v, st.Mask) else v) for k, v in out.items()},
               f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_masks_from_all_reduced_statistics_equal_one_process_on_all_batches(ranks):
    model, batches = make_model(), selection_batches()
    sam = st.select(model, "sam", DENSITY, data=batches, loss_fn=loss_fn, always_train=HEAD)
    fisher = st.select(model, "child_pruning", DENSITY, data=batches, loss_fn=loss_fn,
                       max_grad_norm=None)
    gradient = accumulated_gradient(model, loss_fn, batches)
    for out in ranks:
        assert st.Mask(out["sam"], always_train=HEAD) == sam
        assert st.Mask(out["child_pruning"]) == fisher
        for name, g in gradient.items():
            torch.testing.assert_close(out["gradient"][name], g, rtol=1e-12, atol=1e-14)
    assert sam.num_selected == st.budget_size(sam.num_total, DENSITY)


def test_broadcast_gives_every_rank_the_source_mask(ranks):
    model = make_model()
    assert all(st.Mask(out["random"]) == st.select(model, "random", DENSITY, seed=7)
               for out in ranks)
    rank0 = st.select(model, "random", DENSITY, seed=0)
    assert all(st.Mask(out["broadcast"]) == rank0 for out in ranks)
    assert ranks[0]["broadcast_check"] == "no error"
    assert ranks[1]["broadcast_check"].startswith("StateMismatchError: rank 1's mask")
    for out in ranks:
        assert out["different_masks"].startswith("StateMismatchError: the ranks hold different")
        # A selection that fails on rank 0 fails on every rank instead of leaving them waiting.
        assert out["failed_selection"].startswith("InvalidArgumentError")
        assert "density must be in (0, 1]" in out["failed_selection"]


def test_ddp_with_sparse_adamw_equals_one_process_on_the_concatenated_batches(ranks):
    model = make_model()
    mask = st.Mask(ranks[0]["sam"], always_train=HEAD)
    base = copy.deepcopy(model)
    opt = st.SparseAdamW(model, mask, **HYPER)
    for step in range(STEPS):
        x, y = training_batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # mean over 8 = mean of the ranks' means
        opt.step()
    for out in ranks:
        assert out["ranks_bit_identical"]
        assert out["state_entries"] == mask.num_trainable  # compact state on each rank
        for name, p in model.named_parameters():
            torch.testing.assert_close(out["weights"][name], p.detach(), rtol=0, atol=1e-13)
            frozen = ~mask[name]
            assert torch.equal(out["weights"][name][frozen], base.get_parameter(name)[frozen])
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in mask)


def test_fsdp2_sharded_parameters_are_refused_clearly(ranks):
    for out in ranks:
        assert out["fsdp_ddp_check"] == "no error"
        message = out["fsdp_check"]
        assert message.startswith("InvalidArgumentError: SparseAdamW does not support sharded")
        assert "FSDP2 fully_shard" in message and "DistributedDataParallel" in message
        # SparseAdamW / SparseSGD train FSDP2 shards (tests/test_fsdp2.py); MaskedOptimizer refuses
        assert out["fsdp_sparse_adamw"] == "no error" and out["fsdp_masked"] != "no error"


def test_masked_optimizer_refuses_fsdp2_with_the_clear_error(ranks):
    for out in ranks:
        message = out["fsdp_masked"]
        assert message.startswith("InvalidArgumentError") and "FSDP2" in message


def test_collectives_need_an_initialised_process_group():
    with pytest.raises(st.InvalidArgumentError, match="init_process_group"):
        broadcast_mask(None)
    with pytest.raises(st.InvalidArgumentError, match="init_process_group"):
        select_distributed(make_model(), "random", 0.5)
