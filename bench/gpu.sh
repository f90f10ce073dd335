#!/usr/bin/env bash
# One prepared run on a lent H100/H200 (see bench/README.md): CUDA tests, then the SD1.5 benchmark table.
#
#   device run:  bash bench/gpu.sh        carry: [".whl"]        timeout_s: 600
#
# Budget: under 8 minutes of wall time in all (each section has its own timeout below; the sum is 425 s plus
# set-up). Every section writes its results under $OUT as it goes (the bench rewrites its JSON after each
# measurement), so a section that times out still returns what it measured, and the next section runs anyway.
# At most 8 files come back from $OUT: gpu.log, tests.log, 3 section JSONs, results.json, RESULTS-gpu.md.
#
# Without a GPU, `GBSD_GPU_SMOKE=1 PY=/tmp/venv/bin/python bash bench/gpu.sh` runs the same script end to end on
# the CPU at tiny size (no wheels, no tests), to check its plumbing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gbsd-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

PY=${PY:-python3}
SMOKE=${GBSD_GPU_SMOKE:-0}
# Sizes of the benchmark (the issue's table): SD1.5, 512x512, 50 DDIM steps, CFG 7.5, fp16, batch 1.
BENCH=("$PY" -m bench --arch sd15 --device cuda --dtype fp16 --size 512 --steps 50 --cfg 7.5 --batch 1)
if [[ $SMOKE == 1 ]]; then
  BENCH=("$PY" -m bench --arch sd15 --tiny --device cpu --dtype fp32 --size 64 --steps 3 --threads 1)
fi

merge() {
  # Whatever sections finished (or half-finished): one JSON and one markdown table with cross-section ratios.
  local inputs=()
  for f in "$OUT"/bench-*.json; do [[ -s $f ]] && inputs+=("$f"); done
  if (( ${#inputs[@]} )); then
    "$PY" -m bench.merge "$OUT/results.json" "${inputs[@]}" --markdown "$OUT/RESULTS-gpu.md" || true
  fi
  stamp "done"
}
trap merge EXIT

stamp "machine"
if [[ $SMOKE == 1 ]]; then
  echo "GBSD_GPU_SMOKE=1: tiny CPU run of this script's plumbing"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
  uptime || true

  stamp "install carried wheels (diffusers, open_clip, ftfy, wcwidth) into /tmp/site"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/ carried: see bench/README.md (run with carry=[\".whl\"])"; exit 2
  fi
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c 'import diffusers, open_clip, transformers; print("diffusers", diffusers.__version__, "open_clip",
open_clip.__version__, "transformers", transformers.__version__)'

  stamp "CUDA tests: kernels and fast path (75 s)"
  set +e
  timeout 75 python3 -m pytest -q -m "not fullsize" tests/fast -rs > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -n 15 "$OUT/tests.log"
  set -e
fi

section() {  # section NAME SECONDS bench-args... : one bench process, its own JSON, never fatal
  local name=$1 secs=$2; shift 2
  stamp "bench section $name ($secs s): $*"
  set +e
  timeout --kill-after=10 "$secs" "${BENCH[@]}" "$@" --json "$OUT/bench-$name.json"
  echo "section $name rc=$?"
  set -e
}

# Eager, fast and CUDA-graph configurations and the diffusers eager baseline; the GBSD sweep (K=10, sigma=0.8)
# with the fast configuration, its K independent runs measured.
section eager 130 --configs eager,fast,graphs,diffusers --repeat 10 --loop-repeat 3 \
  --sweep fast --sweep-k 10 --sweep-layout 0.8 --sweep-independent measure
# torch.compile, each side in its own process (compilation dominates; a hang costs one section only).
section ours-compile 110 --configs fast+compile --repeat 10 --loop-repeat 3 --parts step,loop,vae,e2e
section diffusers-compile 110 --configs diffusers+compile --repeat 10 --loop-repeat 3 --parts step,loop,vae,e2e
