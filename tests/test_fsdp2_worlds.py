"""SparseAdamW / SparseSGD under FSDP2 on 4 gloo ranks, in float64 and float32.

Four ranks split the tiny MLP's dim-0 sizes 5, 3, 1 as 2+2+1+0, 1+1+1+0 and 1+0+0+0 (empty
shards on most ranks). After the steps the gathered parameters must equal one process on the
concatenated batches (float64: 1e-12, float32: 1e-6), frozen entries bit-identical; ranks that
pass different masks get one clear error each.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import batch, init, make_model, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed/gloo"),
    pytest.mark.slow,  # 4 spawned ranks: about 20 s of CPU
]

WORLD = 4
STEPS = 5
MAX_NORM = 0.05  # every step clips
CASES = {  # name -> (dtype, optimizer class, hyperparameters, tolerance)
    "adamw64": (torch.float64, st.SparseAdamW, dict(lr=0.05, weight_decay=0.1), 1e-12),
    "sgd64": (torch.float64, st.SparseSGD, dict(lr=0.1, momentum=0.9, nesterov=True), 1e-12),
    "adamw32": (torch.float32, st.SparseAdamW, dict(lr=0.05, weight_decay=0.1), 1e-6),
}


def make_mask(model: nn.Module, seed: int = 3) -> st.Mask:
    return st.select(model, "random", 0.4, seed=seed, always_train=["4.bias"], progress=False)


def run(model: nn.Module, opt, rank: int = 0, world: int = 1) -> list:
    dtype = next(model.parameters()).dtype
    norms = []
    for step in range(STEPS):
        x, y = batch(step, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows(rank, world)]), y[rows(rank, world)]).backward()
        norms.append(float(opt.clip_grad_norm_(MAX_NORM)))
        opt.step()
    return norms


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    out: dict = {}
    for case, (dtype, cls, hyper, _) in CASES.items():
        model = shard(make_model(dtype), mesh)
        opt = cls(model, make_mask(make_model(dtype)), **hyper)
        norms = run(model, opt, rank, world)
        out[case] = {
            "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "norms": torch.tensor(norms, dtype=torch.float64),
            "count": sum(opt.selection(p).count for p in model.parameters()),
        }
    model = shard(make_model(), mesh)
    mask = make_mask(make_model(), seed=3 + (rank == 2))  # rank 2 holds another mask
    out["different_masks"] = outcome(lambda: st.SparseAdamW(model, mask, lr=0.1))
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2_worlds"))


@pytest.mark.parametrize("case", list(CASES))
def test_four_ranks_equal_one_process(ranks, case):
    dtype, cls, hyper, tolerance = CASES[case]
    model, base = make_model(dtype), make_model(dtype)
    mask = make_mask(base)
    norms = run(model, cls(model, mask, **hyper))
    assert sum(out[case]["count"] for out in ranks) == mask.num_trainable
    for out in ranks:
        torch.testing.assert_close(out[case]["norms"], torch.tensor(norms, dtype=torch.float64),
                                   rtol=tolerance, atol=0)
        for name, p in model.named_parameters():
            got = out[case]["weights"][name]
            torch.testing.assert_close(got, p.detach(), rtol=0, atol=tolerance)
            assert torch.equal(got[~mask[name]], base.get_parameter(name)[~mask[name]])
    assert all(n > MAX_NORM for n in norms)


def test_ranks_with_different_masks_are_refused_on_every_rank(ranks):
    for out in ranks:
        assert out["different_masks"].startswith(
            "StateMismatchError: SparseAdamW: the ranks hold different masks"), out
