"""Training step time and peak memory on one GPU: full fine-tuning, peft LoRA and SHiRA, and
sparsetune with dense and sparse gradients, side by side in one run (issue 23); and the
optimizer step alone, SparseAdamW against torch AdamW (fused and foreach) in float32.

Model: a LlamaForCausalLM from a config with TinyLlama-1.1B's shapes (hidden 2048, 22 layers,
intermediate 5632, 32 heads, 4 KV heads, vocabulary 32000, SDPA), random weights, in bfloat16
(``--dtype``), batches of 4 x 1024 random tokens. Each row: 3 warm-up steps, then the median
of 8 timed steps (CUDA events; ``time.perf_counter`` on CPU); peak =
``torch.cuda.max_memory_allocated`` over the row's steps (None on CPU). sparsetune rows train
as many entries as LoRA r=16 on q_proj/v_proj (a random mask over every parameter, or over
q/v by ``targets=``). A row that fails records its error and the run goes on. ``--small``
runs tiny shapes on the CPU in seconds (what the test runs).

    python benchmarks/gpu.py                      # on a GPU: <= 5 minutes
    python benchmarks/gpu.py --small --output /tmp/gpu-small.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import sparsetune as st  # noqa: E402
from benchmarks._common import environment, write_json  # noqa: E402

DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results" / "gpu"
FULL = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
        "batch": 4, "seq_len": 1024}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 172,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
         "batch": 2, "seq_len": 32}
CPU = {"hidden_size": 512, "num_hidden_layers": 4, "intermediate_size": 1376,
       "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
       "batch": 2, "seq_len": 256}
SHAPES = {"full": FULL, "small": SMALL, "cpu": CPU}
QV = ["q_proj", "v_proj"]
OPTIMIZER_DENSITY = 0.005


class Timer:
    """Per-step times in ms: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def build_model(shapes: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{k: v for k, v in shapes.items() if k not in ("batch", "seq_len")},
        max_position_embeddings=max(2048, shapes["seq_len"]), attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def lora_count(model: torch.nn.Module, r: int = 16) -> int:
    """Entries LoRA r trains on q_proj and v_proj: r (in + out) per adapted Linear."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in QV)


def measure(model, opt, batch: torch.Tensor, device: torch.device, warmup: int, steps: int,
            step_fn: Callable[[], None] | None = None) -> dict[str, Any]:
    grad_bytes: list[int] = []

    def train_step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        if not grad_bytes:  # what the backward left in .grad (compact: the values only)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_bytes.append(sum((g._values() if g.is_sparse else g).nbytes for g in grads))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = step_fn or train_step
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        timer(step)
    times = [timer(step) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_ms": statistics.median(times), "times_ms": times, "peak_gib": peak,
            "grad_bytes": grad_bytes[0] if grad_bytes else None}


def _torch_adamw(params, device: torch.device, kind: str = "fused"):
    del device  # fused AdamW runs on CPU tensors too (torch >= 2.4)
    return torch.optim.AdamW(params, lr=1e-5, **{kind: True})


def row_full(ctx: dict) -> dict[str, Any]:
    model = build_model(ctx["shapes"], ctx["device"], ctx["dtype"])
    opt = _torch_adamw(model.parameters(), ctx["device"])
    trained = sum(p.numel() for p in model.parameters())
    return {"trained": trained, **measure(model, opt, ctx["batch"], ctx["device"], *ctx["n"])}


def _peft_row(ctx: dict, config_name: str) -> dict[str, Any]:
    import peft

    model = build_model(ctx["shapes"], ctx["device"], ctx["dtype"])
    config = getattr(peft, config_name)(r=16, target_modules=QV)
    model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _torch_adamw(params, ctx["device"])
    trained = sum(p.numel() for p in params)  # SHiRA: its r (in + out) values per layer
    return {"trained": trained, **measure(model, opt, ctx["batch"], ctx["device"], *ctx["n"])}


def row_lora(ctx: dict) -> dict[str, Any]:
    return _peft_row(ctx, "LoraConfig")


def row_shira(ctx: dict) -> dict[str, Any]:
    import peft

    if not hasattr(peft, "ShiraConfig"):
        raise RuntimeError(f"peft {peft.__version__} has no SHiRA")
    return _peft_row(ctx, "ShiraConfig")


def _sparsetune_row(ctx: dict, targets: list[str] | None, sparse_grads: bool,
                    freeze_unselected: bool = True) -> dict[str, Any]:
    model = build_model(ctx["shapes"], ctx["device"], ctx["dtype"])
    total = sum(p.numel() for p in model.parameters())
    density = lora_count(model) / total
    begin = time.perf_counter()
    mask = st.select(model, "random", density, targets=targets)
    select_s = time.perf_counter() - begin
    opt = st.SparseAdamW(model, mask, lr=1e-5, freeze_unselected=freeze_unselected)
    handle = st.prepare(model, mask) if sparse_grads else None
    try:
        result = measure(model, opt, ctx["batch"], ctx["device"], *ctx["n"])
    finally:
        if handle is not None:
            handle.remove()
    return {"trained": int(mask.num_selected),
            "select_s": select_s, **result}


def row_st_global_dense(ctx: dict) -> dict[str, Any]:
    return _sparsetune_row(ctx, None, sparse_grads=False)


def row_st_qv_dense(ctx: dict) -> dict[str, Any]:
    return _sparsetune_row(ctx, QV, sparse_grads=False)


def row_st_qv_dense_unfrozen(ctx: dict) -> dict[str, Any]:
    return _sparsetune_row(ctx, QV, sparse_grads=False, freeze_unselected=False)


def row_st_qv_prepare(ctx: dict) -> dict[str, Any]:
    return _sparsetune_row(ctx, QV, sparse_grads=True)


def row_st_global_prepare(ctx: dict) -> dict[str, Any]:
    return _sparsetune_row(ctx, None, sparse_grads=True)


def row_st_qv_attach(ctx: dict, kernel: bool = True) -> dict[str, Any]:
    """Delta modules (issue 24): the q/v mask attached over the frozen base, fp32 values,
    torch AdamW(fused) over ``handle.parameters()``, as LoRA is trained. ``kernel=False``: the
    delta products take the embedding-bag twin instead of the Triton kernel (where it runs)."""
    from sparsetune.modules import functions

    model = build_model(ctx["shapes"], ctx["device"], ctx["dtype"])
    density = lora_count(model) / sum(p.numel() for p in model.parameters())
    mask = st.select(model, "random", density, targets=QV, progress=False)
    handle = st.attach(model, mask, name="task")
    opt = _torch_adamw(list(handle.parameters()), ctx["device"])
    saved, functions.DELTA_KERNEL = functions.DELTA_KERNEL, kernel
    try:
        return {"trained": handle.num_values,
                **measure(model, opt, ctx["batch"], ctx["device"], *ctx["n"])}
    finally:
        functions.DELTA_KERNEL = saved


def row_st_qv_attach_bags(ctx: dict) -> dict[str, Any]:
    return row_st_qv_attach(ctx, kernel=False)


def _optimizer_row(ctx: dict, kind: str) -> dict[str, Any]:
    """The optimizer step alone on the float32 model, dense gradients present."""
    model = build_model(ctx["shapes"], ctx["device"], torch.float32)
    gen = torch.Generator(device=ctx["device"]).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
    if kind == "sparse":
        mask = st.select(model, "random", OPTIMIZER_DENSITY)
        opt = st.SparseAdamW(model, mask, lr=1e-5)
        trained = int(mask.num_selected)
    else:
        opt = _torch_adamw(model.parameters(), ctx["device"], kind)
        trained = sum(p.numel() for p in model.parameters())
    return {"trained": trained,
            **measure(model, opt, ctx["batch"], ctx["device"], *ctx["n"], step_fn=opt.step)}


def row_opt_fused(ctx: dict) -> dict[str, Any]:
    return _optimizer_row(ctx, "fused")


def row_opt_foreach(ctx: dict) -> dict[str, Any]:
    return _optimizer_row(ctx, "foreach")


def row_opt_sparse(ctx: dict) -> dict[str, Any]:
    return _optimizer_row(ctx, "sparse")


ROWS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "full": ("full fine-tuning, torch AdamW(fused)", row_full),
    "lora": ("peft LoRA r=16 on q_proj, v_proj", row_lora),
    "shira": ("peft SHiRA r=16 on q_proj, v_proj", row_shira),
    "st_global_dense": ("sparsetune SparseAdamW, random mask over all params, dense grads",
                        row_st_global_dense),
    "st_qv_dense": ("sparsetune, q/v mask (targets=), dense grads", row_st_qv_dense),
    "st_qv_dense_unfrozen": ("the same, freeze_unselected=False (every tensor gets a grad)",
                             row_st_qv_dense_unfrozen),
    "st_qv_prepare": ("sparsetune, q/v mask + prepare (sparse grads)", row_st_qv_prepare),
    "st_qv_attach": ("sparsetune st.attach q/v delta over the frozen base, AdamW(fused)",
                     row_st_qv_attach),
    "st_qv_attach_bags": ("the same, delta products by embedding bags (no Triton kernel)",
                          row_st_qv_attach_bags),
    "st_global_prepare": ("sparsetune, global mask + prepare (sparse grads)",
                          row_st_global_prepare),
    "opt_fused": ("optimizer step alone, fp32: torch AdamW(fused)", row_opt_fused),
    "opt_foreach": ("optimizer step alone, fp32: torch AdamW(foreach)", row_opt_foreach),
    "opt_sparse": (f"optimizer step alone, fp32: SparseAdamW p={OPTIMIZER_DENSITY:.1%}",
                   row_opt_sparse),
}


def _versions(device: torch.device) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("peft", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = None
    found["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu")
    found["cuda"] = torch.version.cuda
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU, in seconds")
    p.add_argument("--shapes", choices=list(SHAPES), default=None,
                   help="full (TinyLlama-1.1B, default), small (= --small) or cpu (a ~50M "
                        "model for CPU evidence)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", type=Path, default=None,
                   help="JSON file (default: benchmarks/results/gpu/gpu[-small].json)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.small and args.shapes not in (None, "small"):
        raise SystemExit(f"--small contradicts --shapes {args.shapes}")
    name = "small" if args.small else args.shapes or "full"
    shapes = SHAPES[name]
    device = torch.device("cuda" if name == "full" and torch.cuda.is_available() else "cpu")
    steps, warmup = (2, 1) if name == "small" else (args.steps, args.warmup)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shapes["vocab_size"], (shapes["batch"], shapes["seq_len"]),
                          generator=gen).to(device)
    ctx = {"shapes": shapes, "device": device, "dtype": getattr(torch, args.dtype),
           "batch": batch, "n": (warmup, steps)}
    rows: list[dict[str, Any]] = []
    output = args.output or DEFAULT_OUTPUT_DIR / f"gpu{'' if name == 'full' else '-' + name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def result(complete: bool) -> dict[str, Any]:
        return {"benchmark": "gpu", "small": name == "small", "shapes_name": name,
                "dtype": args.dtype, "shapes": shapes, "warmup": warmup, "steps": steps,
                "environment": {**environment(), **_versions(device)}, "rows": rows,
                "complete": complete}

    print(f"{'row':<20} {'trained':>14} {'step ms':>9} {'peak GiB':>9}  description")
    for key in args.rows:
        description, fn = ROWS[key]
        row: dict[str, Any] = {"row": key, "description": description}
        try:
            row.update(fn(ctx))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=8)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if "error" in row:
            print(f"{key:<20} {'-':>14} {'-':>9} {'-':>9}  {description}: {row['error'][:80]}")
        else:
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            trained = "-" if row.get("trained") is None else f"{row['trained']:,}"
            print(f"{key:<20} {trained:>14} {row['step_ms']:>9.2f} {peak:>9}  {description}")
        write_json(output, result(complete=False))  # what a time limit cuts off is kept
    final = result(complete=True)
    write_json(output, final)
    print(f"wrote {output}")
    return final


if __name__ == "__main__":
    main()
