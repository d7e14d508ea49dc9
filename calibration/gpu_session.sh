#!/usr/bin/env bash
# One step of a GPU session, run through the device tool from the repository root (results under $OUT):
#   bash calibration/gpu_session.sh speed [SECONDS]       the throughput grid (issue 14: another GPU kind or machine)
#   bash calibration/gpu_session.sh calibrate [MINUTES]   `qfit calibrate --gpu auto` as a user runs it (issue 17)
#   bash calibration/gpu_session.sh methods [S1] [S2]     LoRA on 16-bit / 8-bit bases: step times, then memory (issue 18)
#   bash calibration/gpu_session.sh methods-speed GRID SECONDS [MODELS]   a methods step-time grid, models in order
#   bash calibration/gpu_session.sh methods-memory GRID SECONDS           a methods memory grid (harness)
# bitsandbytes comes from the wheel in .whl/ (../shared/scripts/gpu-wheels.sh; carry [".whl"]).
set -uo pipefail
step=${1:?speed, calibrate or methods}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in *H200*) kind=h200 ;; *H100*) kind=h100 ;; *) kind=gpu ;; esac
tag=$kind-$(date -u +%m%d-%H%M)
mkdir -p "$OUT"
{
  echo "step: $step; GPU: $name"; nvidia-smi; nproc; lscpu | grep 'Model name'
  python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)"
} > "$OUT/env-$step-$tag.txt" 2>&1
quiet() { grep -v -e "Loading weights" -e "Writing model shards" -e "it/s]" ; }
case "$step" in
  speed)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.train.throughput \
      --grid calibration/grids/speed.json --out "$OUT/$kind-speed-c.csv" --time-limit "${2:-400}" \
      --min-timed-seconds 2 --models llama-3.1-8b,qwen2.5-1.5b,qwen2.5-0.5b,qwen2.5-14b,mistral-7b \
      2>&1 | quiet | tee "$OUT/speed-$tag.log" | grep "^\[speed\]" | tail -60
    ;;
  calibrate)
    export QFIT_CACHE=/dev/shm/qfit-cache
    python3 -c "from planner.cli import main; main()" calibrate --gpu auto --minutes "${2:-6}" 2>&1 | quiet \
      | tee "$OUT/calibrate-$tag.log" | grep -v "^{'" | tail -80
    mkdir -p "$OUT/calibrate"
    cp "$QFIT_CACHE"/*.csv "$QFIT_CACHE"/*.json "$OUT/calibrate/" 2>/dev/null
    cp -r "$QFIT_CACHE/coefficients" "$OUT/calibrate/" 2>/dev/null
    ls -la "$OUT/calibrate" "$OUT/calibrate/coefficients" 2>&1 | tail -12
    ;;
  methods)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.train.throughput \
      --grid calibration/grids/methods-speed.json --out "$OUT/$kind-methods-speed.csv" --time-limit "${2:-200}" \
      --min-timed-seconds 2 2>&1 | quiet | tee "$OUT/methods-speed-$tag.log" | grep "^\[speed\]" | tail -40
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.train.harness --grid methods-a \
      --out "$OUT/$kind-methods-a-expandable.csv" --time-limit "${3:-200}" 2>&1 | quiet \
      | tee "$OUT/methods-a-$tag.log" | tail -30
    ;;
  methods-speed)
    g=${2:?grid name}
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.train.throughput \
      --grid "calibration/grids/$g.json" --out "$OUT/$kind-$g.csv" --time-limit "${3:-500}" --min-timed-seconds 2 \
      ${4:+--models "$4"} 2>&1 | quiet | tee "$OUT/$g-$tag.log" | grep "^\[speed\]" | tail -70
    ;;
  methods-memory)
    g=${2:?grid name}
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.train.harness --grid "$g" \
      --out "$OUT/$kind-$g-expandable.csv" --time-limit "${3:-300}" 2>&1 | quiet | tee "$OUT/$g-$tag.log" | tail -30
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
