"""Where each fixed-mask method of the quality benchmark spends its budget, and how they overlap.

Builds every fixed mask exactly as ``benchmarks/quality.py`` does (same model, seed, selection
batches, options; Rotten Tomatoes, p = 0.5%, the head always trained and left out here) and
reports, per method:

* the share of the budget by kind of parameter (embeddings, attention Q/K/V, attention output,
  FFN in, FFN out, LayerNorm, biases) and by layer;
* the overlap (Jaccard index, and the fraction of the method's entries that are also among the
  top p of |delta|) with the entries full fine-tuning moves most: the top-p entries of |delta| of
  a full fine-tuning solution (``--full-delta``, a ``SparseDelta`` file, default the subspace
  benchmark's Rotten Tomatoes seed-0 solution) — a mask chosen in hindsight;
* the pairwise Jaccard index between methods.

Writes ``results/mask_anatomy.json`` and prints the tables::

    .venv/bin/python -m benchmarks.mask_anatomy           # ~12 min on a shared core
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import quality
from benchmarks._common import environment, write_json
from sparsetune import Mask, SparseDelta, budget_size

RESULTS = Path(__file__).parent / "results"
DEFAULT_FULL_DELTA = RESULTS / "subspace_runs" / "rotten_tomatoes" / "full-seed0.safetensors"
FIXED_MASK_METHODS = ("random", "bitfit", "magnitude", "diff_pruning", "child_pruning",
                      "lt_sft", "sam", "sam_curvature", "sam_per_tensor", "sam_fisher", "sam_probe")
KINDS = ("embeddings", "attention qkv", "attention out", "ffn in", "ffn out", "layernorm",
         "bias", "pooler")


def kind_of(name: str) -> str:
    """The kind of a BERT parameter, by its name (weights and biases of LayerNorm: layernorm)."""
    if "LayerNorm" in name:
        return "layernorm"
    if name.endswith(".bias"):
        return "bias"
    if ".embeddings." in name or name.startswith("embeddings."):
        return "embeddings"
    if "pooler" in name:
        return "pooler"
    if re.search(r"attention\.self\.(query|key|value)", name):
        return "attention qkv"
    if "attention.output.dense" in name:
        return "attention out"
    if "intermediate.dense" in name:
        return "ffn in"
    if "output.dense" in name:
        return "ffn out"
    raise ValueError(f"no kind for parameter {name!r}")


def layer_of(name: str) -> str:
    match = re.search(r"layer\.(\d+)\.", name)
    return f"layer {match.group(1)}" if match else ("embeddings" if "embeddings" in name
                                                   else "other")


def _flat(mask: Mask, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([mask[n].reshape(-1) for n in names])


def hindsight_mask(dense: dict[str, torch.Tensor], sizes: dict[str, int],
                   k: int) -> torch.Tensor:
    """The k entries with the largest |delta| (``dense``: name -> change, absent names unchanged)
    over ``sizes``' names, flat in that order."""
    names = list(sizes)
    magnitude = torch.cat([dense[n].abs().reshape(-1).float() if n in dense
                           else torch.zeros(sizes[n]) for n in names])
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    keep[torch.topk(magnitude, k).indices] = True
    return keep


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _shares(counts: dict[str, int], group: Callable[[str], str],
            keys: Sequence[str] = ()) -> dict[str, float]:
    """Each group's share of the total count (``group``: parameter name -> its group; ``keys``
    listed even when empty)."""
    out: dict[str, int] = {k: 0 for k in keys}
    for n, c in counts.items():
        out[group(n)] = out.get(group(n), 0) + c
    total = max(1, sum(out.values()))
    return {k: v / total for k, v in out.items()}


def anatomy(mask: Mask, budgeted: Sequence[str]) -> dict[str, Any]:
    rows = mask.per_parameter()
    counts = {n: rows[n].selected for n in budgeted}
    return {
        "selected": sum(counts.values()),
        "share_by_kind": _shares(counts, kind_of, KINDS),
        "share_by_layer": _shares(counts, layer_of),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", choices=FIXED_MASK_METHODS,
                    default=list(FIXED_MASK_METHODS))
    ap.add_argument("--full-delta", type=Path, default=DEFAULT_FULL_DELTA)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", type=Path, default=RESULTS / "mask_anatomy.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = quality.Protocol()
    runner = quality.Runner(protocol, RESULTS / "quality")
    masks: dict[str, Mask] = {}
    seconds: dict[str, float] = {}
    for method in args.methods:
        spec = quality.RunSpec(args.task, method,
                               quality.density_for(method, protocol.density), args.seed, 1e-3)
        tick = time.perf_counter()
        setup = quality.RECIPES[method].build(runner.context(spec), 1e-3)
        seconds[method] = time.perf_counter() - tick
        masks[method] = setup.mask
        print(f"  {method}: {setup.mask.num_selected:,} entries ({seconds[method]:.0f} s)",
              flush=True)
    first = next(iter(masks.values()))
    budgeted = [n for n in first if n not in first.always_train]
    k = budget_size(first.num_total, protocol.density)
    flat = {m: _flat(mask, budgeted) for m, mask in masks.items()}
    result: dict[str, Any] = {
        "command": "python -m benchmarks.mask_anatomy " + shlex.join(sys.argv[1:]
                                                                    if argv is None else argv),
        "environment": environment(), "task": args.task, "seed": args.seed,
        "density": protocol.density, "budget": k, "select_seconds": seconds,
        "methods": {m: anatomy(mask, budgeted) for m, mask in masks.items()},
    }
    if args.full_delta.exists():
        sizes = {n: first[n].numel() for n in budgeted}
        oracle = hindsight_mask(SparseDelta.load(args.full_delta).to_dense(), sizes, k)
        result["hindsight"] = {
            "delta": str(args.full_delta), "entries": k,
            "share_by_kind": _shares({n: int(part.sum()) for n, part in zip(
                budgeted, torch.split(oracle, list(sizes.values())))}, kind_of, KINDS),
        }
        for m, bits in flat.items():
            result["methods"][m]["jaccard_with_hindsight"] = jaccard(bits, oracle)
            result["methods"][m]["in_hindsight"] = (
                int((bits & oracle).sum()) / max(1, int(bits.sum())))
    else:
        print(f"  no full fine-tuning delta at {args.full_delta}: hindsight overlap skipped")
    names = list(flat)
    result["jaccard"] = {a: {b: jaccard(flat[a], flat[b]) for b in names} for a in names}
    write_json(args.output, result)
    print(format_tables(result))
    return result


def format_tables(result: dict[str, Any]) -> str:
    methods = result["methods"]
    rows = [dict(name=m, **r) for m, r in methods.items()]
    if "hindsight" in result:
        rows.append({"name": "full FT top-p |delta|",
                     "share_by_kind": result["hindsight"]["share_by_kind"]})
    lines = ["Share of the budget by kind (%)", "",
             "| method | " + " | ".join(KINDS) + " | in full FT's top p | Jaccard with it |",
             "|---|" + "---:|" * (len(KINDS) + 2)]
    for r in rows:
        shares = " | ".join(f"{100 * r['share_by_kind'][k]:.1f}" for k in KINDS)
        extra = (f"{100 * r['in_hindsight']:.1f} | {r['jaccard_with_hindsight']:.3f}"
                 if "in_hindsight" in r else "- | -")
        lines.append(f"| {r['name']} | {shares} | {extra} |")
    names = list(result["jaccard"])
    lines += ["", "Pairwise Jaccard index", "", "| | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{result['jaccard'][a][b]:.3f}" for b in names)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
