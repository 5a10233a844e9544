"""Shared test settings and small seeded models.

Every hypothesis test runs under the ``sparsetune`` profile: no deadline (torch's first call
into a kernel is slow and would trip it), few examples, derandomized so a run is reproducible.

A Triton kernel's test module names its kernel module ``KERNEL`` and takes the
``interpreter`` fixture: ``TRITON_INTERPRET=1`` for the rest of that module, with the kernel
module imported afresh (Triton picks the interpreter when the kernels are defined, at import)
and any compiled build of it restored after.

Device-dependent tests take the ``device`` fixture: CPU always, CUDA too where
``torch.cuda.is_available()``. Every test that uses it is marked ``device``, so ``pytest -m
device`` runs exactly those (on a GPU machine: both halves).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from sparsetune import Mask

settings.register_profile(
    "sparsetune",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sparsetune")


@pytest.fixture(scope="module")
def interpreter(request: pytest.FixtureRequest) -> Iterator[None]:
    """``TRITON_INTERPRET=1`` for the rest of the requesting module (module docstring), whose
    ``KERNEL`` names the Triton kernel module to import afresh."""
    kernel = request.module.KERNEL
    assert importlib.util.find_spec("triton") is not None, (
        "triton is a test dependency (the gpu extra): run `make install`")
    saved = sys.modules.pop(kernel, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
    sys.modules.pop(kernel, None)
    if saved is not None:
        sys.modules[kernel] = saved


class TinyMLP(nn.Module):
    """4 -> 5 -> 3 tanh MLP; with ``scalar=True`` the output is scaled by a 0-dim parameter."""

    def __init__(self, d_in: int = 4, d_hidden: int = 5, d_out: int = 3, scalar: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.scale = nn.Parameter(torch.tensor(1.25)) if scalar else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.tanh(self.fc1(x)))
        return y * self.scale if self.scale is not None else y


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each available device in turn: ``cpu`` always, ``cuda`` where present."""
    return torch.device(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that takes ``device`` with the ``device`` marker."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def make_mlp() -> Callable[..., TinyMLP]:
    """Factory: ``make_mlp(seed=0, dtype=torch.float64, scalar=False)`` -> a seeded TinyMLP.

    The global RNG is left as it was, so tests do not depend on each other's order.
    """

    def factory(seed: int = 0, dtype: torch.dtype = torch.float64, scalar: bool = False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TinyMLP(scalar=scalar).to(dtype)

    return factory


@pytest.fixture(scope="session")
def make_mask() -> Callable[..., Mask]:
    """Factory: a seeded Bernoulli(density) mask over every parameter of ``model``.

    ``frozen`` names are set all False and ``full`` names all True. Partly selected parameters
    are guaranteed to have at least one selected and one frozen entry (when they have two or
    more entries), so every test sees the "some" case it asks for.
    """

    def factory(
        model: nn.Module,
        density: float = 0.5,
        seed: int = 0,
        frozen: Iterable[str] = (),
        full: Iterable[str] = (),
    ) -> Mask:
        gen = torch.Generator().manual_seed(seed)
        frozen, full = set(frozen), set(full)
        bits = {}
        for name, p in model.named_parameters():
            if name in frozen:
                bits[name] = torch.zeros(p.shape, dtype=torch.bool)
            elif name in full:
                bits[name] = torch.ones(p.shape, dtype=torch.bool)
            else:
                b = torch.rand(p.shape, generator=gen) < density
                if b.numel() >= 2:
                    b.view(-1)[0], b.view(-1)[-1] = True, False
                bits[name] = b
        return Mask.from_dict(bits)

    return factory


@pytest.fixture(scope="session")
def make_batches() -> Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]:
    """Factory: ``make_batches(n, dtype=torch.float64, seed=0)`` -> n seeded (x, y) pairs."""

    def factory(n: int, dtype: torch.dtype = torch.float64, seed: int = 0, batch: int = 6):
        gen = torch.Generator().manual_seed(seed)
        return [
            (
                torch.randn(batch, 4, generator=gen).to(dtype),
                torch.randn(batch, 3, generator=gen).to(dtype),
            )
            for _ in range(n)
        ]

    return factory


@pytest.fixture(scope="session")
def make_convnet() -> Callable[..., nn.Module]:
    """Factory: a seeded float64 conv net whose conv weight is channels_last (non-contiguous).

    Input: (batch, 2, 5, 5) in channels_last; output: (batch, 2).
    """

    def factory(seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 2))
        net = net.to(torch.float64).to(memory_format=torch.channels_last)
        assert not net[0].weight.is_contiguous()
        return net

    return factory


@pytest.fixture(autouse=True)
def _no_global_torch_state_leaks():
    """A test (or code under test) must not leave autograd off or change the default dtype."""
    yield
    assert torch.is_grad_enabled(), "autograd was left disabled"
    assert torch.get_default_dtype() == torch.float32, "the default dtype was left changed"
