#!/usr/bin/env bash
# Everything that needs a GPU, in one command (for a lent machine with no network, or any CUDA box):
#   STEPS="env tests aot bench tune" DEADLINE=570 OUT=outputs/gpu bash benchmarks/gpu_session.sh
# env: devices and versions; tests: the kernel tests (tests/test_kernels_*.py: the interpreter tests run compiled on
# the GPU, plus the bf16 ZAYA1-8B-shape tests and the whole-model triton-vs-eager check); aot: zaya_kernels.aot_check
# (registers and spills); bench: benchmarks/bench_kernels.py -> $OUT/kernels.json; tune: benchmarks/tune_kernels.py
# -> $OUT/tune.json. Each step gets what is left of DEADLINE seconds, so a partial run still returns its files.
# Works without `make setup`: wheels in .whl/ (e.g. a newer transformers) are installed to /tmp/site, and the
# kernels/ folder is linked as `zaya_kernels` when the project is not installed.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
STEPS=${STEPS:-env tests aot bench tune}
DEADLINE=${DEADLINE:-3600}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import zaya_kernels" 2>/dev/null; then
  mkdir -p /tmp/zk && ln -sfn "$PWD/kernels" /tmp/zk/zaya_kernels
  export PYTHONPATH=/tmp/zk:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
step() {  # step NAME LOGFILE CMD...
  local name=$1 log=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t; t=$(left)
  if (( t < 20 )); then echo "== $name: skipped, deadline reached" | tee -a "$OUT/session.log"; return 0; fi
  echo "== $name ($t s left)" | tee -a "$OUT/session.log"
  local t0; t0=$(date +%s)
  timeout "$t" "$@" > "$OUT/$log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/session.log"
  tail -n "${TAIL:-25}" "$OUT/$log"
}
step env env.log bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; \
  $PY -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"   # kernel compiles are CPU-bound: 8 workers
TAIL=12 step tests pytest.log $PY -m pytest -q -p no:cacheprovider -rs $XDIST tests/test_kernels_cca_qk.py tests/test_kernels_attention.py \
  tests/test_kernels_moe.py tests/test_kernels_gpu.py tests/test_kernels_model.py tests/test_kernels_aot.py
TAIL=16 step aot aot.log env TRITON_INTERPRET=0 $PY -m zaya_kernels.aot_check
TAIL=14 step bench bench.log $PY benchmarks/bench_kernels.py --out "$OUT/kernels.json"
TAIL=${TUNE_TAIL:-70} step tune tune.log $PY benchmarks/tune_kernels.py --out "$OUT/tune.json" ${TUNE_ARGS:-}
echo "session: $(( $(date +%s) - start )) s"
