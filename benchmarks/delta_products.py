"""A delta's CPU product, out (N, a) += x M^T row-major, by each route the layout can take.

For each (a, b) shape and k / (a + b) (entries per row plus column of M, the measure of
``functions.NATIVE_PER_LINE`` and ``CSR_PER_LINE``), a random M with k entries and x: (N, b)
float32: the C kernel (``native``), MKL's CSR product into out's transpose (``mkl``) and the
embedding bags over x^T added (``bags``), alternated call by call (``--rounds`` rounds) so that
machine noise hits all three alike; median milliseconds per product and which route the layout
chooses for that shape.

    python benchmarks/delta_products.py [--tokens 1024] [--threads 2] [--quick]

Results: ``benchmarks/results/delta_products.json`` (``delta_products-quick.json`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks._common import environment, loadavg, positive_int, write_json  # noqa: E402
from sparsetune.kernels import native_available, native_unavailable_reason  # noqa: E402
from sparsetune.modules import CsrLayout, functions  # noqa: E402

__all__ = ["main"]

SHAPES = [(384, 384), (1536, 384), (384, 1536), (512, 512), (2048, 2048)]
PER_LINE = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
QUICK_SHAPES, QUICK_PER_LINE = [(24, 16)], [1.0, 4.0]


def _routes(layout: CsrLayout, values: torch.Tensor, x: torch.Tensor,
            out: torch.Tensor) -> dict[str, Any]:
    shape = layout.shape
    routes = {
        "mkl": lambda: functions._csr_add_(out, layout.crow, layout.col, values, shape, x),
        "bags": lambda: out.add_(functions._bags(layout.col, layout.crow, values,
                                                 x.t().contiguous())),
    }
    if native_available():
        routes["native"] = lambda: functions._csr_add_(out, layout.crow, layout.col, values,
                                                       shape, x, native=True)
    return routes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time every route on every shape and density; write and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=1024)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few rounds")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ns = parser.parse_args(argv)
    shapes, per_lines = (QUICK_SHAPES, QUICK_PER_LINE) if ns.quick else (SHAPES, PER_LINE)
    rounds = min(ns.rounds, 3) if ns.quick else ns.rounds
    tokens = min(ns.tokens, 16) if ns.quick else ns.tokens
    torch.set_num_threads(ns.threads)
    g = torch.Generator().manual_seed(ns.seed)
    rows = []
    for a, b in shapes:
        for per_line in per_lines:
            k = min(a * b, int(per_line * (a + b)))
            flat = torch.randperm(a * b, generator=g)[:k].sort().values
            layout = CsrLayout(flat // b, flat % b, (a, b))
            values = torch.randn(k, generator=g)
            x = torch.randn(tokens, b, generator=g)
            out = torch.zeros(tokens, a)
            routes = _routes(layout, values, x, out)
            times: dict[str, list[float]] = {name: [] for name in routes}
            for _ in range(rounds + 1):  # the first round warms up
                for name, run in routes.items():
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            ms = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
            rows.append({"a": a, "b": b, "k": k, "entries_per_line": k / (a + b),
                         "median_ms": ms, "fastest": min(ms, key=ms.__getitem__),
                         "layout_route": layout.cpu_route(values) or "bags"})
            print(f"{a:5d} x {b:<5d} k/(a+b) {k / (a + b):6.2f}  "
                  + "  ".join(f"{n} {v:7.3f} ms" for n, v in sorted(ms.items()))
                  + f"  fastest {rows[-1]['fastest']:6s} layout {rows[-1]['layout_route']}")
    results = {"benchmark": "delta_products", "tokens": tokens, "threads": ns.threads,
               "rounds": rounds, "native_kernel": native_available(),
               "native_unavailable_reason": native_unavailable_reason(),
               "native_per_line": functions.NATIVE_PER_LINE,
               "csr_per_line": functions.CSR_PER_LINE, "environment": environment(),
               "loadavg_end": loadavg(), "rows": rows}
    name = "delta_products-quick.json" if ns.quick else "delta_products.json"
    write_json(ns.output_dir / name, results)
    return results


if __name__ == "__main__":
    main()
