"""select_distributed on an FSDP2 model == one process's select: 2 and 4 gloo ranks on the CPU.

Each rank scores its own shards of the tiny MLP (dim-0 sizes 5, 3, 1: uneven shards, empty
ones) and the exact top-k is merged across ranks; for ``sam`` (also after a head warm-up),
``sam_curvature`` (finite-difference or precomputed curvature), ``child_pruning`` and
``diff_pruning`` each rank feeds its rows of every global batch (the
burn-in methods: test_fsdp2_burn_in.py; the trained scores on a classifier:
test_fsdp2_trained_scores.py). Every supported method must give, on every rank, the mask
(digest) of ``st.select`` on the unsharded model with the global batches; ties (a model of
rounded weights) must go to the lowest global index, as in one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import batch, init, make_model, outcome, rows, run_ranks, shard
from torch import nn

import sparsetune as st
from sparsetune.integrations.distributed import select_distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

HEAD = ["4.bias"]
CURVATURE = {  # a precomputed h of every parameter's full shape, signs mixed (then floored)
    n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
    for i, (n, p) in enumerate(make_model().named_parameters())}
NUM_BATCHES = 3
CASES = {  # name -> (method, density, options); data-driven methods get the batches
    "random": ("random", 0.4, dict(seed=3, always_train=HEAD)),
    "random_per_tensor": ("random", 0.4, dict(seed=5, scope="per_tensor")),
    "random_targets": ("random", 0.2, dict(seed=1, targets=[r"^[02]\.weight$"])),
    "bitfit": ("bitfit", None, {}),
    "names": ("names", None, dict(include=r"^2\.", always_train=HEAD)),
    "magnitude": ("magnitude", 0.3, dict(always_train=HEAD)),
    "magnitude_per_tensor": ("magnitude", 0.5, dict(scope="per_tensor")),
    "magnitude_targets": ("magnitude", 0.2, dict(targets=["0", "2"])),
    "magnitude_ties": ("magnitude", 0.35, {}),
    "sam": ("sam", 0.3, dict(always_train=HEAD, max_grad_norm=0.05)),
    "sam_per_tensor": ("sam", 0.5, dict(scope="per_tensor", max_grad_norm=None)),
    "child_pruning": ("child_pruning", 0.25, dict(num_batches=2)),
    "sam_warmup": ("sam", 0.3, dict(always_train=HEAD, head_warmup_steps=4, head_warmup_lr=0.3,
                                    max_grad_norm=None)),
    "diff_pruning": ("diff_pruning", 0.3, dict(always_train=HEAD, steps=4, lr=0.05,
                                               l0_weight=1e-3)),
    "sam_curvature": ("sam_curvature", 0.3, dict(always_train=HEAD, num_batches=2,
                                                 curvature_method="finite_difference",
                                                 num_samples=3, max_grad_norm=0.05)),
    "sam_curvature_given": ("sam_curvature", 0.5, dict(scope="per_tensor", floor_fraction=0.5,
                                                       curvature=CURVATURE)),
}


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(data[0]), data[1])


def case_model(case: str) -> nn.Module:
    model = make_model()
    if case == "magnitude_ties":  # few distinct magnitudes: many ties, across shards too
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 4).round() / 4)
    return model


def data(rank: int | None = None, world: int = 1) -> list:
    """The global batches (rank None) or rank ``rank``'s rows of each."""
    steps = [batch(step) for step in range(NUM_BATCHES)]
    if rank is None:
        return steps
    return [(x[rows(rank, world)], y[rows(rank, world)]) for x, y in steps]


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init(rank, world, folder)
    out: dict = {}
    for case, (method, density, options) in CASES.items():
        model = shard(case_model(case), mesh)
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        mask = select_distributed(model, method, density, data=data(rank, world),
                                  loss_fn=loss_fn, **options)
        out[case] = mask.digest()
        after = {n: p.full_tensor() for n, p in model.named_parameters()}
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(p.grad is None for p in model.parameters()) and model.training
    model = shard(make_model(), mesh)
    out["hutchinson"] = outcome(lambda: select_distributed(
        model, "sam_curvature", 0.3, data=data(rank, world), loss_fn=loss_fn))
    out["warmup_no_head"] = outcome(lambda: select_distributed(
        model, "sam", 0.3, data=data(rank, world), loss_fn=loss_fn, head_warmup_steps=2))
    uneven = data(rank, world)[: 1 + (rank == world - 1)]  # the last rank has one more batch
    out["uneven"] = outcome(lambda: select_distributed(model, "sam", 0.3, data=uneven,
                                                      loss_fn=loss_fn))
    out["no_data"] = outcome(lambda: select_distributed(model, "sam", 0.3, loss_fn=loss_fn))
    out["after_errors"] = select_distributed(model, "magnitude", 0.3).digest()  # still in step
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp(f"fsdp2_select_{request.param}")
    return run_ranks(_worker, request.param, folder)


def _one_process(case: str) -> st.Mask:
    method, density, options = CASES[case]
    needs_data = method in ("sam", "child_pruning", "diff_pruning", "sam_curvature")
    return st.select(case_model(case), method, density, progress=False,
                     data=data() if needs_data else None,
                     loss_fn=loss_fn if needs_data else None, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_selection_equals_one_process(ranks, case):
    expected = _one_process(case)
    assert 0 < expected.num_trainable < expected.num_total + expected.num_always_trained
    for out in ranks:
        assert out[case] == expected.digest(), case


def test_ties_go_to_the_lowest_global_index(ranks):
    mask = _one_process("magnitude_ties")
    scores = {n: p.detach().abs() for n, p in case_model("magnitude_ties").named_parameters()}
    threshold = min(float(scores[n][mask[n]].min()) for n in mask if mask.count(n))
    split = [n for n in mask if bool((scores[n][~mask[n]] == threshold).any())]
    assert split  # the budget really cuts through a tie, which one process breaks by index


def test_unsupported_and_bad_input_raise_on_every_rank(ranks):
    for out in ranks:
        assert out["hutchinson"].startswith(
            "InvalidArgumentError: rank 0: select_distributed: sam_curvature with "
            "curvature_method='hutchinson' is not supported on a sharded (FSDP2) model: it "
            "needs Hessian-vector products"), out
        assert out["warmup_no_head"].startswith(
            "InvalidArgumentError: rank 0: head_warmup_steps trains the always_train "
            "parameters (the task head) alone before scoring, but always_train is empty")
        assert out["uneven"].startswith("InvalidArgumentError: rank 0: the ranks ran out of "
                                        "batches at different steps")
        assert out["no_data"].startswith("InvalidArgumentError: rank 0: method 'sam' needs data")
        assert out["after_errors"] == ranks[0]["after_errors"]
