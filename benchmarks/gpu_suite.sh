#!/usr/bin/env bash
# Issue #19's one call on a lent GPU, prepared on CPU: versions, the compiled kernels against the XLA reference,
# kernel speed on Llama-7B shapes, decode speed of a 7B-shaped Llama, GPTQ time of one 7B layer. Everything lands
# in $OUT (JSON, PNG, suite.log); each step has its own time limit so that a hung step cannot eat the lease, and the
# whole stays under about 8 minutes.
#
#   run(command="OUT=$OUT bash benchmarks/gpu_suite.sh", timeout_s=560)
#
# Nothing is installed: the device image has jax (CUDA), flax, optax, torch, triton, pyyaml, rich. SmolLM2's
# weights do not travel (over the 64 MiB limit), so decode runs the randomly initialised 7B-shaped Llama only.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks" JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
log() { echo "== $1 ($(date +%T))" | tee -a "$OUT/suite.log"; }

log versions
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import jax, jaxlib, flax, torch, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'flax', flax.__version__, 'torch', torch.__version__, 'triton', triton.__version__); print(jax.devices())"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt" >> "$OUT/suite.log"

log "compiled kernels vs the XLA reference (benchmarks/gpu_check.py)"
timeout 150 $PY benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1
echo "exit $?; $(tail -n 1 "$OUT/gpu_check.log")" | tee -a "$OUT/suite.log"

log "kernel speed (benchmarks/kernels.py)"
timeout 200 $PY benchmarks/kernels.py --out "$OUT" --ms 1 4 16 64 256 2048 4096 --repeats 10 \
  > "$OUT/kernels.log" 2>&1
echo "exit $?" | tee -a "$OUT/suite.log"

log "decode, 7B-shaped Llama, bf16 / W8A16 / W4A16 (benchmarks/decode.py)"
timeout 90 $PY benchmarks/decode.py --out "$OUT" --models llama7b-2l > "$OUT/decode.log" 2>&1
echo "exit $?" | tee -a "$OUT/suite.log"

log "GPTQ of one 7B layer, K 4096 / 11008 x N 4096 (benchmarks/gptq_speed.py)"
timeout 60 $PY benchmarks/gptq_speed.py --out "$OUT" --sizes 4096 11008 --numpy-max-k 0 > "$OUT/gptq.log" 2>&1
echo "exit $?" | tee -a "$OUT/suite.log"

log done
grep -E "^(FAIL|[0-9]+ of)" "$OUT/gpu_check.log" | tail -n 12
tail -n 25 "$OUT/kernels.log"
tail -n 8 "$OUT/decode.log"
