"""Attach-mode step vs in-place sparse-gradient step (issue 24's CPU target).

The embedded MiniLM (2-class head) on random token batches (default 16 x 64), one mask for
both: a seeded random p = 0.5% of every 2-D weight plus the whole head (classifier weight and
bias). ``attach``: ``st.attach`` + ``torch.optim.AdamW`` (foreach) over the k values, base
frozen; ``inplace``: ``st.prepare`` (sparse weight gradients) + ``st.SparseAdamW``, writing the
base; ``attach_mkl``: attach with the CPU row products on MKL's CSR product instead of the C
kernel (``functions.NATIVE = False``; what a machine without a C compiler gets). Each runs in
its own process, so that peak RSS (VmHWM, reset after the model, mask and
optimizer are built) is its own, and all three once more in one process, stepped in turn
(``interleaved``: the step times; on a shared VM, where slow spells last seconds, the median of
the per-round ratios attach / in-place is far steadier than separate processes' medians, which
moved the ratio by +-20% between repeats on 2026-12-06). Target: both ratios <= 1.

Each variant's own process runs twice over: under glibc's default allocator (its step times,
``step_median_s_separate``, and a peak RSS that also counts what the allocator kept from
earlier steps: it depends on the order of allocations and moves the ratio by +-5% between
runs), and with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--mmap-threshold``; 0 skips these runs),
where freed buffers go back to the system, so the peak RSS is the peak of live memory
(``peak_rss_bytes`` ratio; the page faults of those runs slow the steps, whose times are not
compared).

    python benchmarks/attach.py [--rounds 24] [--steps 12] [--threads 2] [--repeats 2]

Results: ``benchmarks/results/attach.json`` (and ``attach-<UTC date>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import sparsetune as st  # noqa: E402
from benchmarks._common import environment, loadavg, write_json  # noqa: E402
from benchmarks.optimizer import (  # noqa: E402
    _release_free_memory,
    _reset_peak_rss,
    _status_bytes,
)

__all__ = ["main", "run_interleaved", "run_variant"]

VARIANTS = ("inplace", "attach", "attach_mkl")
CHILD_FLAG, RESULT_PREFIX = "--child", "RESULT "


def _mask(model: torch.nn.Module, density: float, seed: int) -> st.Mask:
    g = torch.Generator().manual_seed(seed)
    bits = {n: (torch.rand(p.shape, generator=g) < density) if p.dim() == 2
            else torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    return st.Mask.from_dict(bits, always_train=("classifier.weight", "classifier.bias"))


def _build(variant: str, args: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, optimizer, mask) of one variant, seeded like every other variant."""
    from sparsetune.data import load_pretrained

    torch.manual_seed(args["seed"])
    model, _ = load_pretrained(None, num_labels=2, seed=args["seed"])
    model.train()
    mask = _mask(model, args["density"], args["seed"])
    if variant.startswith("attach"):
        handle = st.attach(model, mask, name="task")
        opt = torch.optim.AdamW(handle.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    else:
        st.prepare(model, mask)
        opt = st.SparseAdamW(model, mask, lr=1e-4, weight_decay=0.0)
    return model, opt, mask


def _batches(model: Any, args: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(args["seed"] + 1)
    vocab = model.config.vocab_size
    return [{"input_ids": torch.randint(0, vocab, (args["batch"], args["length"]), generator=g),
             "attention_mask": torch.ones(args["batch"], args["length"], dtype=torch.long),
             "labels": torch.randint(0, 2, (args["batch"],), generator=g)}
            for _ in range(args["steps"])]


def _step(variant: str, model: Any, opt: Any, batch: dict[str, torch.Tensor]) -> float:
    """One timed training step; ``attach_mkl`` runs with the C kernel switched off."""
    from sparsetune.modules import functions

    functions.NATIVE = variant != "attach_mkl"
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_variant(variant: str, args: dict[str, Any]) -> dict[str, Any]:
    """One variant's timed steps alone in this process (its peak RSS); returns its row."""
    from sparsetune.modules import functions

    torch.set_num_threads(args["threads"])
    model, opt, mask = _build(variant, args)
    batches = _batches(model, args)
    _release_free_memory()
    reset, before = _reset_peak_rss(), _status_bytes("VmRSS")
    times = [_step(variant, model, opt, batch) for batch in batches]
    peak = _status_bytes("VmHWM")
    return {"variant": variant, "num_selected": mask.num_selected,
            "step_median_s": statistics.median(times[args["warmup"]:]), "step_times_s": times,
            "peak_reset": reset, "rss_before_bytes": before, "peak_rss_bytes": peak,
            "native_kernel": variant != "attach_mkl" and functions._native_ok(),
            "torch_threads": torch.get_num_threads()}


def run_interleaved(args: dict[str, Any]) -> dict[str, Any]:
    """Every variant built in this one process and stepped in turn, round after round, so
    that the machine's drift (seconds-long slow spells on a shared VM) hits all alike: per
    variant the median step, and per attach variant the median over rounds of its step over
    in-place's step of the same round."""
    torch.set_num_threads(args["threads"])
    built = {v: _build(v, args) for v in VARIANTS}
    batches = _batches(built["inplace"][0], args)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for batch in batches:
        for v, (model, opt, _) in built.items():
            times[v].append(_step(v, model, opt, batch))
    warm = args["warmup"]
    return {"variants": {v: {"step_median_s": statistics.median(t[warm:]), "step_times_s": t}
                         for v, t in times.items()},
            "paired_ratio_median": {
                v: statistics.median(a / b for a, b in zip(times[v][warm:],
                                                           times["inplace"][warm:],
                                                           strict=True))
                for v in VARIANTS if v != "inplace"},
            "torch_threads": torch.get_num_threads()}


def _child(variant: str, args: dict[str, Any], mmap_threshold: int) -> dict[str, Any]:
    """``run_variant`` (or ``run_interleaved`` for variant "interleaved") in a child process."""
    spec = json.dumps({"variant": variant, "args": args})
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, spec],
                          capture_output=True, text=True, timeout=3600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "mmap_threshold": mmap_threshold,
                "error": proc.stderr.strip()[-2000:]}
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "mmap_threshold": mmap_threshold}


def _best(rows: list[dict[str, Any]], threshold: int, key: str) -> dict[str, Any] | None:
    """Per variant, the row of the smallest ``key`` among the runs with ``threshold``."""
    best = {v: min((r for r in rows if r["variant"] == v and "error" not in r
                    and r["mmap_threshold"] == threshold),
                   key=lambda r: r[key], default=None) for v in VARIANTS}
    return best if all(best.values()) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both variants (alternating, ``--repeats`` times, under glibc's default allocator
    and again with ``--mmap-threshold``); write and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="steps of each separate run")
    parser.add_argument("--rounds", type=int, default=24,
                        help="rounds of the interleaved run (one step of each variant each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ of the live-memory runs (0: skip them)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ns = parser.parse_args(argv)
    args = {k: v for k, v in vars(ns).items()
            if k not in ("output_dir", "mmap_threshold", "rounds")}
    thresholds = [0] + ([ns.mmap_threshold] if ns.mmap_threshold else [])
    interleaved = _child("interleaved", {**args, "steps": ns.rounds}, 0)
    rows = [_child(v, args, t) for t in thresholds for _ in range(ns.repeats) for v in VARIANTS]
    ratios = {}
    if "error" not in interleaved:
        ratios["step_median_s"] = interleaved["paired_ratio_median"]["attach"]
        ratios["step_median_s_mkl"] = interleaved["paired_ratio_median"]["attach_mkl"]
    timed = _best(rows, 0, "step_median_s")
    if timed:
        ratios["step_median_s_separate"] = (timed["attach"]["step_median_s"]
                                            / timed["inplace"]["step_median_s"])
        ratios["peak_rss_bytes_glibc_default"] = (timed["attach"]["peak_rss_bytes"]
                                                  / timed["inplace"]["peak_rss_bytes"])
    live = _best(rows, ns.mmap_threshold, "peak_rss_bytes") if ns.mmap_threshold else None
    if live:
        ratios["peak_rss_bytes"] = (live["attach"]["peak_rss_bytes"]
                                    / live["inplace"]["peak_rss_bytes"])
    results = {"benchmark": "attach", "args": args, "mmap_threshold": ns.mmap_threshold,
               "environment": environment(), "loadavg_end": loadavg(),
               "interleaved": interleaved, "rows": rows,
               "attach_over_inplace": ratios,
               "targets_met": {k: v <= 1.0 for k, v in ratios.items()
                               if k in ("step_median_s", "peak_rss_bytes")}}
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for name in (f"attach-{day}.json", "attach.json"):
        write_json(ns.output_dir / name, results)
    for v, r in interleaved.get("variants", {}).items():
        print(f"{'interleaved':14s} {v:10s} step {r['step_median_s'] * 1e3:8.1f} ms")
    for label, best in (("glibc default", timed), ("live peak", live)):
        for v, r in (best or {}).items():
            print(f"{label:14s} {v:10s} step {r['step_median_s'] * 1e3:8.1f} ms  peak RSS "
                  f"{r['peak_rss_bytes'] / 2**20:8.1f} MB  k={r['num_selected']:,}")
    print("attach / inplace:", {k: round(v, 3) for k, v in ratios.items()})
    return results


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        spec = json.loads(sys.argv[2])
        run = (run_interleaved(spec["args"]) if spec["variant"] == "interleaved"
               else run_variant(spec["variant"], spec["args"]))
        print(RESULT_PREFIX + json.dumps(run), flush=True)
    else:
        main()
