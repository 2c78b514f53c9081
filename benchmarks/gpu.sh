#!/usr/bin/env bash
# The full throughput table on one GPU in under 10 minutes (SD 1.5 architecture, random weights,
# 512 px, batch 1): float32 vs bfloat16, einsum vs cuDNN attention, the joint gradient variant,
# remat, and the persistent compilation cache (second-process compile).
#   bash benchmarks/gpu.sh [OUT_DIR]      -> OUT_DIR/gpu_table.md and one JSON per row
# Needs a CUDA-enabled jax already installed (nothing is downloaded here). The PyTorch
# reference is timed only if this torch build sees the GPU (a CPU torch would time the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT"
python - <<'PY' || exit 3
import sys, jax
devs = jax.devices()
if devs[0].platform != "gpu":
    sys.exit(f"benchmarks/gpu.sh: no GPU backend in this jax ({jax.__version__}): devices "
             f"{devs}; install a CUDA build of jax (jax[cuda12]) first")
print("GPU:", devs[0].device_kind, "jax", jax.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
TORCH=$(python -c "import torch; print('eager,compile' if torch.cuda.is_available() else 'none')" 2>/dev/null || echo none)
COMMON=(--model sd15 --resolution 512 --batch 1 --steps 8 --repeats 3 --markdown "$OUT/gpu_table.md")
run() {  # name, seconds, options...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" python -m benchmarks.throughput "${COMMON[@]}" --json "$OUT/$name.json" "$@" \
    || echo "== $name: failed or timed out (exit $?)"
}
START=$SECONDS
run bf16_xla_cache 170 --dtype bfloat16 --attention xla --torch "$TORCH" \
    --compilation-cache "$OUT/jax_cache" --second-process
run bf16_cudnn 110 --dtype bfloat16 --attention cudnn --torch none
run bf16_cudnn_joint 100 --dtype bfloat16 --attention cudnn --gradient joint --torch none
run bf16_cudnn_remat 100 --dtype bfloat16 --attention cudnn --remat --torch none
run f32_einsum 110 --dtype float32 --attention einsum --torch "${TORCH%%,*}"
echo "== total $((SECONDS - START)) s; table: $OUT/gpu_table.md"
cat "$OUT/gpu_table.md"
