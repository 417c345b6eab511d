#!/usr/bin/env bash
# GPU check of the offloading runtime (issue 13): on one CUDA GPU, in under 8 minutes,
#  1. the CUDA tests (tests marked gpu: pinned host memory, side stream, events, parity),
#  2. the trace replay host -> GPU: plan vs LRU on demand vs all resident, measured next
#     to the simulator's figures with a profile measured on this GPU.
# Writes JSON and logs under $OUT (default benchmarks/results/gpu). Never needed by CI.
#
#   bash benchmarks/gpu_check.sh [TRACE_DIR]    # default: a trace recorded here
#
# TRACE_DIR is any moetrace trace (e.g. an import of ../shared/traces/moe-beyond/...);
# without one, the check records a synthetic one with a tiny model (shape check only).
# DEVICE=cpu runs the same steps on the CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
DEVICE="${DEVICE:-cuda}"
SCALE="${SCALE:-0.5}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install needed: the checkout
WORK="$(mktemp -d /tmp/moetrace-gpu-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

"$PY" - <<EOF | tee "$OUT/env.txt"
import torch, transformers, moetrace
print("torch", torch.__version__, "transformers", transformers.__version__, "moetrace", moetrace.__version__)
if "$DEVICE" == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
EOF

if [ "$DEVICE" = "cuda" ]; then
  timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/runtime 2>&1 | tee "$OUT/pytest-gpu.txt"
fi

TRACE="${1:-}"
if [ -z "$TRACE" ]; then
  TRACE="$WORK/trace"
  "$PY" -c 'from moetrace.tracer.demo import demo_prompts_path; print(demo_prompts_path())' >"$WORK/p"
  head -n 24 "$(cat "$WORK/p")" >"$WORK/prompts.jsonl"
  timeout 120 "$PY" -m moetrace record --prompts "$WORK/prompts.jsonl" --out "$TRACE" \
    --max-new-tokens 16 >/dev/null
fi
# a plan tuned for the replay's expert size (the replay measures its own profile of this
# device's link next to its figures)
BPE="$("$PY" -c "
from moetrace.runtime.skeleton import SkeletonShape
from moetrace.tuner.sim.trace import load_traces
print(SkeletonShape.for_trace(load_traces(['$TRACE']).model, $SCALE).bytes_per_expert)")"
timeout 150 "$PY" -m moetrace tune "$TRACE" --budget 25% --granularity token --bytes-per-expert "$BPE" \
  --out "$WORK/plan.json" >"$OUT/tune.txt" 2>&1
for tier in host; do
  timeout 300 "$PY" -m moetrace bench --replay "$TRACE" --plan "$WORK/plan.json" --store "$WORK/store" \
    --scale "$SCALE" --tier "$tier" --device "$DEVICE" --requests 4 --max-tokens 200 \
    --repeats 3 --out "$OUT/replay-$tier.json" 2>&1 | tee "$OUT/replay-$tier.txt"
done
echo "wrote $OUT"
