#!/usr/bin/env bash
# The GPU checks in one lease: the machine, the 1.3B step benchmark (step time, MFU, peak memory),
# the 1.3B forward against diffusers, then the model / kernel / step tests on the GPU backend.
# Logs and this run's result files go to $OUT (default /tmp/gpu_check). About 7 minutes on an H200.
#   bash benchmarks/gpu_check.sh [remat policies, default "attention_kernel"; e.g. "attention_kernel,full"]
# Wheels in .whl/ are installed first where present, for a machine that cannot reach a package
# registry (diffusers and tensorboardX; not flax: it must be the one built for the machine's jax).
# Exits non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -d .whl ]; then
  rm -rf /tmp/spatialalign_wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/spatialalign_wheels .whl/*.whl \
    && export PYTHONPATH="/tmp/spatialalign_wheels:$PWD"
fi
failed=()
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
touch "$OUT/.start"  # only result files this run wrote are copied to $OUT
if ! timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.bench_train_step --full-1.3b --repeats 3 \
       --remat "${1:-attention_kernel}" 2>&1 | tee "$OUT/bench.log"; then
  # cuDNN may refuse a shape or version: the same step on the blockwise kernel, to still get numbers.
  failed+=(step-cudnn)
  timeout 240 python3 -m benchmarks.bench_train_step --full-1.3b --repeats 2 --remat "${1:-attention_kernel}" \
    --attention blockwise 2>&1 | tee "$OUT/bench_blockwise.log" || failed+=(step-blockwise)
fi
timeout 200 python3 -m benchmarks.bench_forward --full-1.3b --repeats 3 2>&1 | tee "$OUT/forward.log" \
  || failed+=(forward)
find benchmarks/results -name '*_full_1.3b.json' -newer "$OUT/.start" -exec cp {} "$OUT/" \;
JAX_PLATFORMS=cuda,cpu timeout "${TEST_TIMEOUT:-360}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_train_step.py tests/test_model.py -k "not sharded" 2>&1 | tee "$OUT/tests.log" \
  | tail -30 || failed+=(tests)
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
