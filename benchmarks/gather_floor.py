"""The memory floor of a sparse optimizer step: random gathers and scatters with cold caches.

A uniformly random mask at density p puts every selected entry on its own cache line. This
script times, on one flat float32 array of the size of BERT-base (110M entries, 440 MB) and
k = p * 110M sorted random indices, the passes an eager sparse AdamW step needs: gather the
gradient, gather the parameter, scatter the parameter. Caches are flushed before each timing
by streaming a 400 MB buffer. It prints a table and writes benchmarks/results/gather_floor.json.

    .venv/bin/python benchmarks/gather_floor.py [--density 0.005] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsetune.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def _write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=110_000_000)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2M entries, 3 repeats")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.repeats = 2_000_000, 3
    gen = torch.Generator().manual_seed(0)
    n, k = args.entries, int(args.entries * args.density)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    index = torch.randperm(n, generator=gen)[:k].sort().values
    out = torch.empty(k)
    flush = torch.empty(max(n, 100_000_000) if not args.quick else n)
    pool = ThreadPoolExecutor(2)
    halves = [(index[: k // 2], out[: k // 2]), (index[k // 2 :], out[k // 2 :])]

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            flush.add_(1.0)  # evict the caches, as a dense step or a backward would
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def three_passes() -> None:
        torch.index_select(grad, 0, index, out=out)
        torch.index_select(param, 0, index, out=out)
        param.index_put_((index,), out)

    def three_passes_two_threads() -> None:
        list(pool.map(lambda h: torch.index_select(grad, 0, h[0], out=h[1]), halves))
        list(pool.map(lambda h: torch.index_select(param, 0, h[0], out=h[1]), halves))
        list(pool.map(lambda h: param.index_put_((h[0],), h[1]), halves))

    rows = {
        "gather (index_select)": timed(lambda: torch.index_select(grad, 0, index, out=out)),
        "scatter (index_put_)": timed(lambda: param.index_put_((index,), out)),
        "3 passes": timed(three_passes),
        "3 passes, 2 threads": timed(three_passes_two_threads),
    }
    print(f"{n:,} float32 entries, {k:,} random indices (p = {args.density:g}), caches flushed")
    for name, seconds in rows.items():
        print(f"  {name:<24} {seconds * 1e3:8.2f} ms   {seconds / k * 1e9:6.1f} ns per entry")
    payload = {
        "benchmark": "gather_floor",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "entries": n,
        "selected": k,
        "repeats": args.repeats,
        "median_seconds": rows,
    }
    name = "gather_floor-quick.json" if args.quick else "gather_floor.json"
    _write_json(args.output_dir / name, payload)
    return payload


if __name__ == "__main__":
    main()
