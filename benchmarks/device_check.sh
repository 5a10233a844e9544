#!/usr/bin/env bash
# The one script a lent GPU runs (DESIGN.md, "GPU notes"): the device-marked tests on CPU and
# CUDA, benchmarks/gpu.py in bf16 and fp32 (issue 23/24 rows) and selection at 1.1B (issue 22).
# Each part has its own time limit (540 s in all, under the tool's 600 s per command) and the run goes on past a failing part; everything lands in
# $OUT (the device tool's output folder; benchmarks/results/gpu here), with a log per part.
#
#   bash benchmarks/device_check.sh            # on the GPU machine, from the repository root
#   DRY=1 bash benchmarks/device_check.sh      # here: the same steps on tiny CPU shapes
#
# The GPU image has torch, transformers, peft and triton but maybe not pytest/hypothesis:
# where a wheels/ folder travels with the tree (pip download pytest hypothesis -d wheels), they
# are installed from it, offline.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/device_check.log"; }

if [ -d wheels ] && ! $PY -c "import pytest, hypothesis" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links wheels pytest hypothesis >>"$OUT/device_check.log" 2>&1
fi
$PY - <<'EOF' 2>&1 | tee -a "$OUT/device_check.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

if [ "${DRY:-0}" = 1 ]; then
  SHAPES=(--small) SEL=(--sizes 50m --methods random) TESTS=(tests/test_write_selected.py)
else
  SHAPES=() SEL=(--sizes 1.1b --methods random magnitude sam) TESTS=()
fi

log "pytest -m device"
timeout 120 $PY -m pytest -m device -q -x -p no:cacheprovider "${TESTS[@]}" \
  >"$OUT/pytest-device.log" 2>&1
log "pytest rc=$? $(tail -1 "$OUT/pytest-device.log")"

# bf16: every training row (<= 4 minutes; issue 24's rows first, the JSON is rewritten after
# each row so a time limit keeps what ran); fp32: the optimizer step rows (SparseAdamW vs fused
# and foreach AdamW at p = 0.5% of 1.1B entries)
log "gpu.py bfloat16"
timeout 240 $PY benchmarks/gpu.py "${SHAPES[@]}" --dtype bfloat16 --rows lora shira \
  st_qv_attach st_qv_attach_bags st_qv_prepare full st_global_dense st_qv_dense \
  st_qv_dense_unfrozen st_global_prepare \
  --output "$OUT/gpu-bfloat16.json" >"$OUT/gpu-bfloat16.log" 2>&1
log "gpu.py bfloat16 rc=$?"
log "gpu.py float32 optimizer rows"
timeout 90 $PY benchmarks/gpu.py "${SHAPES[@]}" --dtype float32 --rows opt_fused opt_foreach \
  opt_sparse --output "$OUT/gpu-float32-optimizer.json" >"$OUT/gpu-float32-optimizer.log" 2>&1
log "gpu.py float32 rc=$?"

log "selection_scale"
timeout 90 $PY benchmarks/selection_scale.py "${SEL[@]}" --label device \
  >"$OUT/selection_scale.log" 2>&1
log "selection_scale rc=$?"
mv benchmarks/results/selection_scale-device.json "$OUT/" 2>/dev/null
exit 0
