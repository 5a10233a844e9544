"""Per-rank optimizer state and peak RSS under FSDP2 against DDP (issue 25), on CPU with gloo.

A Llama-shaped ``LlamaForCausalLM`` (random weights, float32), the same seeded random mask of
density 0.5% on every rank (chosen on the full model before wrapping), ``SparseAdamW``. For
each world size (1, 2, 4 ranks) and each wrapping: ``fsdp2`` (``fully_shard`` on every decoder
layer, then the root: each rank holds 1/world of the parameters and keeps state for the selected
entries of its shard) and ``ddp`` (``DistributedDataParallel``: every rank holds the full model).
Each rank trains ``--steps`` steps on its own batch (1 x ``--seq-len`` tokens) and reports its
optimizer state bytes (:func:`sparsetune.optimizer_state_nbytes`), its peak RSS over the steps
(VmHWM, reset after the model is wrapped and the optimizer built; ``peak_rss_bytes`` absolute,
``peak_extra_bytes`` above the RSS before the steps) and the median step time.

    python benchmarks/fsdp2.py [--size 120m|350m] [--worlds 1 2 4] [--steps 3]

The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--mmap-threshold``; 0: glibc's default):
buffers of 64 KiB and more are mmapped and return to the system when freed, so VmHWM is the
live peak. With glibc's default, FSDP2's freed all-gather and reduce-scatter buffers stay in
the heap and its peak RSS reads ~1.6x higher than DDP's although less is live (measured:
120m, 2 ranks, 2267 MB vs 1799 MB per rank by default; 1363 MB vs 1708 MB with the setting).

Results: ``benchmarks/results/fsdp2[-SIZE].json``. On 2 cores the 4-rank step times share the
cores, so compare memory across world sizes and times only at equal world size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks._common import environment, write_json  # noqa: E402
from benchmarks.optimizer import (  # noqa: E402
    _release_free_memory,
    _reset_peak_rss,
    _status_bytes,
)

__all__ = ["main"]

SIZES = {  # hidden, layers, heads, intermediate (vocabulary 32,000)
    "tiny": (64, 2, 4, 172),
    "120m": (768, 8, 12, 2048),
    "350m": (1024, 20, 16, 2816),
}
DENSITY = 0.005


def _model(size: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, vocab_size=32000,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def _worker(rank: int, world: int, folder: str, spec: dict[str, Any]) -> None:
    import sparsetune as st

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        model = _model(spec["size"])
        mask = st.select(model, "random", DENSITY, seed=0, progress=False)
        if spec["wrap"] == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            trained, opt_model = model, model
        else:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model)
            opt_model = model
        opt = st.SparseAdamW(opt_model, mask, lr=1e-4)
        gen = torch.Generator().manual_seed(100 + rank)
        batches = [torch.randint(0, 32000, (1, spec["seq_len"]), generator=gen)
                   for _ in range(spec["steps"])]
        _release_free_memory()
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        times = []
        for ids in batches:
            begin = time.perf_counter()
            trained(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - begin)
        peak = _status_bytes("VmHWM")
        row = {"wrap": spec["wrap"], "world": world, "rank": rank,
               "parameters": sum(p.numel() for p in model.parameters()),
               "selected": int(mask.num_selected),
               "state_bytes": st.optimizer_state_nbytes(opt),
               "rss_before_bytes": before, "peak_rss_bytes": peak,
               "peak_extra_bytes": None if peak is None or before is None else peak - before,
               "step_median_s": statistics.median(times), "step_times_s": times}
        torch.save(row, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(wrap: str, world: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One (wrapping, world size): every rank's row, or one row with the error."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.start_processes(_worker, args=(world, folder, {**spec, "wrap": wrap}),
                               nprocs=world, join=True, start_method="spawn")
        except Exception as exc:  # a failed configuration is recorded; the others still run
            return [{"wrap": wrap, "world": world, "error": f"{type(exc).__name__}: {exc}"}]
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True)
                for r in range(world)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="120m")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--wraps", nargs="+", choices=["fsdp2", "ddp"], default=["fsdp2", "ddp"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--mmap-threshold", type=int, default=65536)
    args = parser.parse_args(argv)
    if args.mmap_threshold:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    spec = {"size": args.size, "steps": args.steps, "seq_len": args.seq_len,
            "mmap_threshold": args.mmap_threshold}
    rows: list[dict[str, Any]] = []
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"fsdp2-{args.size}.json"
    print(f"{'wrap':6} {'ranks':>5} {'state MB/rank':>14} {'peak RSS MB/rank':>17} "
          f"{'extra MB/rank':>14} {'step s':>7}")
    for world in args.worlds:
        for wrap in args.wraps:
            found = run(wrap, world, spec)
            rows.extend(found)
            if "error" in found[0]:
                print(f"{wrap:6} {world:>5}  error: {found[0]['error'][:100]}")
                continue
            mb = 2**20
            print(f"{wrap:6} {world:>5} {max(r['state_bytes'] for r in found) / mb:>14.2f} "
                  f"{max(r['peak_rss_bytes'] for r in found) / mb:>17.1f} "
                  f"{max(r['peak_extra_bytes'] for r in found) / mb:>14.1f} "
                  f"{max(r['step_median_s'] for r in found):>7.2f}")
            write_json(output, {"benchmark": "fsdp2", "args": spec, "density": DENSITY,
                                "environment": environment(), "rows": rows})
    print(f"wrote {output}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
