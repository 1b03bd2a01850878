#!/usr/bin/env bash
# The GPU benchmark of issue 12 item 6 (about 4 minutes on one GPU, capped at 8): bf16 stage-1 steps (cached and
# uncached) and a stage-2 LoRA step at batch 4 on the random real-size Qwen2.5-VL-3B with measured peak memory
# beside the planner's, runner latency p50/p99 for 1 and 3 views, the fast-slow loop rate, compile on and off.
# Writes OUT/gpu_bench.json and OUT/gpu_bench.md (benchmarks/bench_gpu.py does the work).
#
#   benchmarks/gpu.sh [OUT]            on a machine with CUDA (fails with a message otherwise)
#   benchmarks/gpu.sh --dry-run [OUT]  on CPU with the tiny model: checks every Python part, measures nothing real
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  exec "$PY" "$HERE/bench_gpu.py" --dry-run --out "${1:-gpu_bench_dryrun}"
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "benchmarks/gpu.sh: no CUDA device is visible to torch (torch.cuda.is_available() is False)." >&2
  echo "Run it on a GPU machine with a CUDA build of torch, or 'benchmarks/gpu.sh --dry-run' to check it on CPU." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PY" "$HERE/bench_gpu.py" --out "${1:-gpu_bench}"
