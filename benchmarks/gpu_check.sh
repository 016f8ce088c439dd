#!/usr/bin/env bash
# The GPU checks in one lease, in parts (all by default, in this order):
#   scoring  the scoring models on CUDA against the CPU and `python -m scoring` end to end on CUDA
#            (tests/test_scoring_cuda.py), then the scoring benchmark at 480x832 in bf16 and fp32;
#   tests    the model / kernel / training-step tests on the GPU backend (all but the 8-device one);
#   train    `python run_train.py`'s smoke run in bf16 on the GPU, then resumed for 10 more steps;
#   step     the 1.3B DPO step benchmark (step time, MFU, peak memory);
#   forward  the 1.3B forward against diffusers;
#   sample   the 1.3B sampler (CFG, 6 steps timed).
# Logs and this run's result files go to $OUT (default /tmp/gpu_check). About 14 minutes on an H200: under a
# 10-minute limit per command, run it as two calls (GPU_CHECK_PARTS=scoring,tests, then train,step,forward,sample).
#   GPU_CHECK_PARTS=scoring,tests bash benchmarks/gpu_check.sh [remat policies, default "attention_kernel"]
# Wheels in .whl/ are installed first where present, for a machine that cannot reach a package
# registry (diffusers, tensorboardX, av; not flax: it must be the one built for the machine's jax).
# Exits non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PARTS="${GPU_CHECK_PARTS:-scoring,tests,train,step,forward,sample}"
PARTS=",${PARTS// /},"  # "scoring, tests" means the same as "scoring,tests"
IFS=, read -ra parts <<< "${PARTS:1}"
for part in "${parts[@]}"; do
  case $part in ""|scoring|tests|train|step|forward|sample) ;;
    *) echo "gpu_check: unknown part '$part' in GPU_CHECK_PARTS (scoring,tests,train,step,forward,sample)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -d .whl ]; then
  rm -rf /tmp/spatialalign_wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/spatialalign_wheels .whl/*.whl \
    && export PYTHONPATH="/tmp/spatialalign_wheels:$PWD"
fi
failed=()
want() { [[ "$PARTS" == *",$1,"* ]]; }
# Result files this run wrote, copied to $OUT after each part: a command killed later keeps them.
collect() { find benchmarks/results \( -name '*_full_1.3b.json' -o -name 'scoring.json' \) -newer "$OUT/.start" \
              -exec cp {} "$OUT/" \; ; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
touch "$OUT/.start"  # only result files this run wrote are copied to $OUT
if want scoring; then
  timeout "${SCORING_TEST_TIMEOUT:-150}" python3 -m pytest -q -s -p no:cacheprovider tests/test_scoring_cuda.py 2>&1 \
    | grep -v "Loading weights\|Writing model shards" | tee "$OUT/scoring_tests.log" || failed+=(scoring-tests)
  for half in --half ""; do
    timeout "${SCORING_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_scoring.py --device cuda --frames 16 $half 2>&1 \
      | grep -v "Loading weights\|Writing model shards" | tee -a "$OUT/scoring_bench.log" || failed+=("scoring-bench$half")
    collect
  done
fi
if want tests; then
  JAX_PLATFORMS=cuda,cpu timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_train_step.py tests/test_model.py -k "not sharded" 2>&1 | tee "$OUT/tests.log" \
    | tail -30 || failed+=(tests)
fi
if want train; then
  rm -rf /tmp/gpu_check_tiny /tmp/gpu_check_tiny_data
  tiny=(--no-progress --set run.dir=/tmp/gpu_check_tiny --set data.store=/tmp/gpu_check_tiny_data
        --set model.dtype=bfloat16 --set model.param_dtype=bfloat16)
  { timeout 150 python3 run_train.py "${tiny[@]}" && timeout 90 python3 run_train.py "${tiny[@]}" --set train.steps=40 \
      && python3 -c "import jax; print('trained on', jax.devices())"; } 2>&1 | tee "$OUT/train.log" || failed+=(train)
fi
if want step && ! timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.bench_train_step --full-1.3b \
       --repeats "${STEP_REPEATS:-3}" --remat "${1:-attention_kernel}" 2>&1 | tee "$OUT/bench.log"; then
  # cuDNN may refuse a shape or version: the same step on the blockwise kernel, to still get numbers.
  failed+=(step-cudnn)
  timeout 240 python3 -m benchmarks.bench_train_step --full-1.3b --repeats 2 --remat "${1:-attention_kernel}" \
    --attention blockwise 2>&1 | tee "$OUT/bench_blockwise.log" || failed+=(step-blockwise)
fi
collect
if want forward; then
  timeout 200 python3 -m benchmarks.bench_forward --full-1.3b --repeats 3 2>&1 | tee "$OUT/forward.log" \
    || failed+=(forward)
  collect
fi
if want sample; then
  timeout 150 python3 -m benchmarks.bench_sampler --full-1.3b --steps 6 --repeats 1 2>&1 | tee "$OUT/sampler.log" \
    || failed+=(sample)
  collect
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
