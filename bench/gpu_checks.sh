#!/usr/bin/env bash
# The decoder's GPU checks in one go (a lent GPU machine's time is short): environment, then
# bench/decoder.py --gpu (extra arguments go to it), then int8 vs bf16 weights (--compare-weights),
# then the CUDA-only tests, then the whole-turn bench (bench/turns.py --gpu). Logs and JSON go to
# $OUT (default ./gpu-checks).
#   bash bench/gpu_checks.sh [--profile gpu-checks/profile.txt]
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed (SDPA path)"
} 2>&1 | tee "$OUT/env.txt"

timeout "${BENCH_TIMEOUT:-300}" $PY bench/decoder.py --gpu --json "$OUT/decoder-gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"

# int8 weights beside bf16 in one run: single stream and 64 streams, weight memory (docs/benchmarks.md).
timeout "${INT8_BENCH_TIMEOUT:-300}" $PY bench/decoder.py --gpu --compare-weights \
  --json "$OUT/decoder-gpu-int8.json" 2>&1 | tee "$OUT/bench-int8.log"
echo "int8 bench exit: ${PIPESTATUS[0]}"

timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider tests/unit/test_engine_gpu.py \
  tests/unit/test_engine_gpu_int8.py tests/parity/test_engine_parity.py -k "gpu or cuda or int8" 2>&1 \
  | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}"

# Whole turns through every process (issue 10): cold / cached / follow-up TTFT beside the engine-only TTFT
# of the same prompt, lazy and eager gateways (writes ~16 GB of random InternVL2-8B weights once).
timeout "${TURNS_TIMEOUT:-420}" $PY -m bench.turns --gpu --compare-eager --rounds 3 \
  --json "$OUT/turns-gpu.json" 2>&1 | tee "$OUT/turns.log"
echo "turns exit: ${PIPESTATUS[0]}"
