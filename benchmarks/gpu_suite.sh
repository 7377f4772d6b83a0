#!/usr/bin/env bash
# Issue #19's one call on a lent GPU, prepared on CPU: versions, the compiled kernels against the XLA reference,
# kernel speed on Llama-7B shapes and torch's int4 / int8 / fp8 matmuls on the same shapes, decode speed of a
# 7B-shaped Llama, GPTQ time of one 7B layer. Everything lands in $OUT (JSON, PNG, suite.log); each step has its own
# time limit so that a hung step cannot eat the lease, and the whole stays under 8 minutes (limits: 480 s). The
# device returns at most 8 files: every output goes to a work folder, packed after each step into
# $OUT/gpu_suite.tar.gz beside a copy of suite.log (so a step that is killed loses only itself).
#
#   run(command="OUT=$OUT bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
#
# The device image has jax (CUDA), flax, optax, torch, triton, pyyaml, rich, tokenizers, safetensors — not `gguf`,
# which jq.apps imports (decode.py). Carry its wheel (pure Python, .gitignore'd folder), fetched here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
# SmolLM2's weights do not travel (over the 64 MiB limit), so decode runs the random 7B-shaped Llama only.
set -u
OUT=${OUT:-out/gpu}
W=${WORK:-/tmp/gpu_suite}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks" JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (gguf): installed beside the image's packages
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log() { tar czf "$OUT/gpu_suite.tar.gz" -C "$W" . ; cp "$W/suite.log" "$OUT/" 2>/dev/null
        echo "== $1 ($(date +%T))" | tee -a "$W/suite.log"; }

log versions
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import jax, jaxlib, flax, torch, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__,
'flax', flax.__version__, 'torch', torch.__version__, 'triton', triton.__version__); print(jax.devices())"
} > "$W/versions.txt" 2>&1
cat "$W/versions.txt" >> "$W/suite.log"

log "compiled kernels vs the XLA reference (benchmarks/gpu_check.py)"
timeout 120 $PY benchmarks/gpu_check.py --out "$W" > "$W/gpu_check.log" 2>&1
echo "exit $?; $(tail -n 1 "$W/gpu_check.log")" | tee -a "$W/suite.log"

SHAPES="4096x4096 4096x11008 11008x4096"
log "kernel speed, weight-only at small M (benchmarks/kernels.py -> OUT/mem)"
timeout 100 $PY benchmarks/kernels.py --out "$W/mem" --shapes $SHAPES --schemes w4a16 w8a16 --ms 1 4 16 64 \
  > "$W/kernels_mem.log" 2>&1
echo "exit $?" | tee -a "$W/suite.log"
log "kernel speed, W8A8 int8 / fp8 at large M (benchmarks/kernels.py -> OUT/compute)"
timeout 80 $PY benchmarks/kernels.py --out "$W/compute" --shapes $SHAPES --schemes w8a8_int8 w8a8_fp8 \
  --ms 256 2048 4096 > "$W/kernels_compute.log" 2>&1
echo "exit $?" | tee -a "$W/suite.log"

log "torch's peers on the same shapes (benchmarks/torch_peers.py)"
timeout 60 $PY benchmarks/torch_peers.py --out "$W" --shapes $SHAPES --ms 1 16 64 2048 4096 \
  > "$W/torch_peers.log" 2>&1
echo "exit $?" | tee -a "$W/suite.log"

log "decode, 7B-shaped Llama, bf16 / W8A16 / W4A16 (benchmarks/decode.py)"
timeout 70 $PY benchmarks/decode.py --out "$W" --models llama7b-2l > "$W/decode.log" 2>&1
echo "exit $?" | tee -a "$W/suite.log"

log "GPTQ of one 7B layer, K 4096 / 11008 x N 4096 (benchmarks/gptq_speed.py)"
timeout 50 $PY benchmarks/gptq_speed.py --out "$W" --sizes 4096 11008 --numpy-max-k 0 > "$W/gptq.log" 2>&1
echo "exit $?" | tee -a "$W/suite.log"

log done
grep -E "^(FAIL|[0-9]+ of)" "$W/gpu_check.log" | tail -n 12
tail -n 12 "$W/kernels_mem.log" "$W/kernels_compute.log"
grep -c error "$W/torch_peers.log"
tail -n 8 "$W/decode.log"
