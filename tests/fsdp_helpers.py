"""Helpers for the FSDP2 tests: spawn gloo ranks with a deadline, shard the tiny model.

:func:`run_ranks` starts ``world`` processes running ``worker(rank, world, folder, *args)``
and fails the test (killing the processes it started) if they have not finished within
``timeout`` seconds, so a collective that waits forever cannot hang the suite. Each worker
saves its outcome to ``folder/rank{r}.pt``; :func:`run_ranks` returns them in rank order.
"""

from __future__ import annotations

import datetime
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

TIMEOUT_S = 60.0


def init(rank: int, world: int, folder: str):
    """Join the gloo group of the test (collectives give up after 30 s) and return a 1-D
    CPU mesh over every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    return init_device_mesh("cpu", (world,))


def outcome(fn: Callable[[], object]) -> str:
    """``"ErrorType: message"`` of what ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def shard(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every Linear of ``model``, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_ranks(worker: Callable[..., None], world: int, folder: Path, *args: object,
              timeout: float = TIMEOUT_S) -> list[dict]:
    """Run ``worker(rank, world, str(folder), *args)`` on ``world`` spawned ranks and return
    each rank's saved ``folder/rank{r}.pt``; fail after ``timeout`` seconds.

    A rank killed by a signal (not by a Python exception: those fail the test at once) gets
    one more try, with a warning naming it: a rank has twice died by SIGABRT while a module's
    ranks started up (once in a full run, once right after another spawning module; never
    reproduced alone or under parallel load). That says nothing about the code under test. A
    second death fails the test."""
    for attempt in (1, 2):
        try:
            return _run_once(worker, world, folder, args, timeout)
        except mp.ProcessExitedException as exc:
            if attempt == 2 or not exc.signal_name:
                raise
            warnings.warn(f"rank {exc.error_index} of {worker.__name__} died by "
                          f"{exc.signal_name}; running the {world} ranks once more",
                          RuntimeWarning, stacklevel=2)
            (folder / "store").unlink(missing_ok=True)  # a fresh rendezvous
    raise AssertionError("unreachable")


def _run_once(worker: Callable[..., None], world: int, folder: Path, args: tuple,
              timeout: float) -> list[dict]:
    context = mp.start_processes(worker, args=(world, str(folder), *args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} ranks of {worker.__name__} did not finish in {timeout} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    """The tiny seeded MLP of the FSDP2 tests: dim-0 sizes 5, 3, 1 split unevenly over 2 and
    4 ranks (with empty shards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
        ).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: 8 examples; of ``world`` ranks, rank r takes rows
    ``r * 8 / world`` onwards (:func:`rows`)."""
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 4, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(8, 1, generator=gen, dtype=torch.float64).to(dtype))


def rows(rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of a global batch of 8."""
    per = 8 // world
    return slice(per * rank, per * rank + per)
