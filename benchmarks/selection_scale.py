"""Selection at LLM scale (issue 22): time and extra peak memory of ``st.select`` per method.

Llama-shaped ``LlamaForCausalLM`` models with random weights in bf16 (``attention_bias=True``,
so that ``bitfit`` has biases to choose): ``50m`` and ``350m`` on CPU, ``1.1b`` (TinyLlama
shapes) where CUDA is present. Each (model, method) runs in a fresh process: the model is
built, then a sampling thread records the process's resident memory (``/proc/self/statm``,
every 2 ms) or the CUDA allocator's peak while ``select`` runs; the extra peak over the
memory held before the call is reported as a multiple of the model's bytes, next to the
targets (0.25x for random, magnitude, bitfit, names and targets; 2.25x for sam, child_pruning
and lt_sft, the last with 2 burn-in steps; ``lt_sft:disk`` is lt_sft with ``offload="disk"``,
theta0 and AdamW's moments in a temporary file, the same mask). The time is that of a second
call, without the sampling thread.

    python benchmarks/selection_scale.py [--sizes 50m 350m] [--methods ...] [--label after]

JSON goes to ``benchmarks/results/selection_scale[-LABEL].json``. Run with another copy of
sparsetune first on ``PYTHONPATH`` (``--label before``) for the figures before a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # hidden, layers, heads, kv heads, intermediate (vocabulary 32,000)
    "50m": (512, 8, 8, 8, 1408),
    "350m": (1024, 20, 16, 16, 2816),
    "1.1b": (2048, 22, 32, 4, 5632),
}
METHODS = ["random", "magnitude", "bitfit", "names", "targets", "sam", "child_pruning", "lt_sft",
           "lt_sft:disk"]
# every other method: 0.25; "lt_sft:disk" is lt_sft with offload="disk" (theta0 and AdamW's
# moments in a temporary file: the same mask)
TARGET = {"sam": 2.25, "child_pruning": 2.25, "lt_sft": 2.25, "lt_sft:disk": 2.25}
DENSITY = 0.005


def _model(size: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=32000,
                         attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(size: str, method: str, device: str) -> dict:
    import torch

    import sparsetune as st

    model = _model(size, device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 32000, (2, 128), generator=gen).to(device)}
               for _ in range(2)]

    def loss(m, b):
        return m(input_ids=b["input_ids"], labels=b["input_ids"]).loss

    kwargs: dict = {"density": DENSITY, "progress": False}  # no tqdm bars in the figures
    name = method
    if method == "bitfit":
        kwargs = {"progress": False}
    elif method == "names":
        kwargs = {"include": r"norm\.weight$", "progress": False}
    elif method == "targets":
        name, kwargs = "magnitude", {**kwargs, "targets": r"(q_proj|v_proj)\.weight$"}
    elif method in ("sam", "child_pruning"):
        kwargs = {**kwargs, "data": batches, "loss_fn": loss, "num_batches": 2}
    elif method == "lt_sft":  # 2 AdamW burn-in steps: enough for the optimizer state to exist
        kwargs = {**kwargs, "data": batches, "loss_fn": loss, "steps": 2}
    elif method == "lt_sft:disk":
        name = "lt_sft"
        kwargs = {**kwargs, "data": batches, "loss_fn": loss, "steps": 2, "offload": "disk"}
    import gc

    gc.collect()
    peak, stop = [0], threading.Event()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    mask = st.select(model, name, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        thread.join()
        extra = max(peak[0], _rss()) - base
    del mask
    start = time.perf_counter()  # timed apart: the sampling thread would hold the GIL
    mask = st.select(model, name, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mask_bytes = getattr(mask, "nbytes", None)
    if mask_bytes is None:  # a bool per entry before the compact Mask
        mask_bytes = sum(mask[n].numel() for n in mask)
    return {"size": size, "method": method, "device": device, "seconds": round(seconds, 3),
            "extra_peak_bytes": extra, "model_bytes": model_bytes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "multiple": round(extra / model_bytes, 3), "target": TARGET.get(method, 0.25),
            "mask_bytes": mask_bytes, "num_selected": mask.num_selected,
            "sparsetune": str(Path(st.__file__).parent)}


def _write(rows: list[dict], label: str | None, status: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"selection_scale{'-' + label if label else ''}.json"
    import torch

    payload = {"status": status, "command": sys.argv, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "density": DENSITY, "rows": rows}
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--label", default=None)
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "METHOD", "DEVICE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    import torch

    cuda = torch.cuda.is_available()
    sizes = args.sizes or (["50m", "350m"] + (["1.1b"] if cuda else []))
    rows: list[dict] = []
    print(f"{'model':>6} {'method':>10} {'device':>6} {'time s':>8} {'extra MB':>9} "
          f"{'x model':>8} {'target':>7} {'mask MB':>8}")
    for size in sizes:
        device = "cuda" if size == "1.1b" else "cpu"
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, "--child", size, method, device],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                print(f"{size:>6} {method:>10} failed: {out.stderr.strip().splitlines()[-1:]}")
                rows.append({"size": size, "method": method, "error": out.stderr[-2000:]})
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            ok = "ok" if row["multiple"] <= row["target"] else "OVER"
            print(f"{size:>6} {method:>10} {device:>6} {row['seconds']:8.2f} "
                  f"{row['extra_peak_bytes'] / 1e6:9.1f} {row['multiple']:7.3f}x "
                  f"{row['target']:6.2f}x {row['mask_bytes'] / 1e6:8.2f} {ok}", flush=True)
            _write(rows, args.label, "running")
    print(f"wrote {_write(rows, args.label, 'done')}")


if __name__ == "__main__":
    main()
