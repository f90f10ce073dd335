#!/usr/bin/env bash
# One prepared script for a lent H100/H200 (bench/README.md, "On a lent GPU"), in two parts sized to the device
# budget (15 minutes per task including the machine's start, 10 minutes per command):
#
#   GBSD_GPU_PART=smoke  (<= 2 min)  versions; the CUDA test cases only; one compiled and one graphed step of every
#                                    configuration at 256^2; a summary that says exactly what broke
#   GBSD_GPU_PART=full   (<= 9 min)  kernel micro-benchmark; the SD1.5 512^2 fp16 table: batch 1,4,8 steps, then
#                                    step+loop before text/VAE/e2e at batch 1, the K=10 sweep, the compiled
#                                    configurations each in their own process with a cap sized for a cold compile;
#                                    then SDXL base at 1024^2 fp16, CFG, batch 1: a few steps' step+loop timing of
#                                    ours (fast, graphs, graphs+compile, cold compile included) against diffusers'
#                                    StableDiffusionXLPipeline (eager, +compile) on the same weights
#   GBSD_GPU_PART=all    (default)   both in one command (about 10.5 min: over one command's limit on the lent
#                                    machines; use two calls there)
#   GBSD_GPU_PART=max                the max-autotune recipes (long cold compiles; for a bigger budget)
#
#   call 1: run(command="GBSD_GPU_PART=smoke bash bench/gpu.sh", carry=[".whl"], timeout_s=170)
#   call 2, while the machine is still warm (it stays ~30 s): command="GBSD_GPU_PART=full bash bench/gpu.sh",
#   timeout_s=560. The full part skips configurations that failed in the smoke part (its results stay on the
#   machine, in $WORK). Sections' caps: smoke 40+25+40 s, full 30+65+80+115+90+45+75 s (the last two: SDXL), plus
#   set-up and merges. The SDXL sections have never run on a GPU: their caps are estimates (a cold inductor compile of
#   the SDXL UNet was not measured); what a cut section measured before its cap is kept.
#
# Every section is one process with its own time cap (timeout, then KILL 10 s later) and JSON; the bench rewrites the
# JSON after each measurement, so a section cut short keeps what it measured and the next section runs anyway. At
# most 8 files come back from $OUT: gpu.log, tests.log, smoke.json, smoke.md, kernels.json, results.json,
# RESULTS-gpu.md (section files stay in $WORK and are merged).
#
# Without a GPU, `GBSD_GPU_SMOKE=1 PY=/path/to/python bash bench/gpu.sh` runs the same script end to end on the CPU
# at tiny size (no wheels, no tests, no compile), to check its plumbing (tests/bench/test_gpu_sh.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gbsd-gpu-out}
WORK=${GBSD_GPU_WORK:-/tmp/gbsd-gpu-work}
PART=${GBSD_GPU_PART:-all}
SMOKE=${GBSD_GPU_SMOKE:-0}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
case $PART in smoke|full|all|max) ;; *) echo "GBSD_GPU_PART must be smoke, full, all or max, got '$PART'"; exit 2;; esac

# What each part runs. The plumbing check (GBSD_GPU_SMOKE=1) swaps in tiny CPU runs of the same shape.
if [[ $SMOKE == 1 ]]; then
  BENCH=("$PY" -m bench --arch sd15 --tiny --device cpu --dtype fp32 --steps 2 --threads 1)
  SDXL=("$PY" -m bench --arch sdxl --tiny --device cpu --dtype fp32 --steps 2 --threads 1 --size 64)
  SDXL_EAGER=fast,diffusers; SDXL_COMPILED=fast
  SMOKE_SIZE=(--size 64); FULL_SIZE=(--size 64); BATCHES=1,2
  EAGER=eager,fast,graphs,diffusers; COMPILED_OURS=fast; COMPILED_DIFFUSERS=diffusers  # no compile on a CPU check
  MAX_CONFIGS=fast; KERNELS=(env TRITON_INTERPRET=1 "$PY" -m bench.kernels --tiny --device cpu --repeat 1)
  REPEAT=(--repeat 1 --warmup 1 --loop-repeat 1 --e2e-repeat 0)
else
  BENCH=("$PY" -m bench --arch sd15 --device cuda --dtype fp16 --steps 50 --cfg 7.5)
  # SDXL: 4 steps (it/s over the loop), 3 timed steps; the first step of a compiled configuration is its cold compile
  SDXL=("$PY" -m bench --arch sdxl --device cuda --dtype fp16 --steps 4 --cfg 7.5 --size 1024 --batch 1)
  SDXL_EAGER=fast,graphs,diffusers; SDXL_COMPILED=graphs+compile,diffusers+compile
  SMOKE_SIZE=(--size 256); FULL_SIZE=(--size 512); BATCHES=1,4,8
  EAGER=eager,fast,fast+triton,graphs,diffusers; COMPILED_OURS=fast+compile,graphs+compile
  COMPILED_DIFFUSERS=diffusers+compile; MAX_CONFIGS=graphs+compile-max,diffusers+compile-max
  KERNELS=("$PY" -m bench.kernels --device cuda --dtype fp16)
  REPEAT=(--repeat 10 --warmup 2 --loop-repeat 2 --e2e-repeat 2)
fi

section() {  # section NAME SECONDS command... : one process, its own cap, never fatal
  local name=$1 secs=$2; shift 2
  stamp "section $name (cap ${secs}s): $*"
  timeout --kill-after=10 "$secs" "$@"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then echo "section $name: CUT at its ${secs}s cap (rc=$rc)"; else
    echo "section $name rc=$rc"; fi
}

merge_into() {  # merge_into BASENAME MARKDOWN section-json... : one JSON + one markdown in $OUT
  local base=$1 md=$2; shift 2
  local inputs=()
  for f in "$@"; do [[ -s $f ]] && inputs+=("$f"); done
  if (( ${#inputs[@]} )); then
    "$PY" -m bench.merge "$OUT/$base.json" "${inputs[@]}" --markdown "$OUT/$md" >/dev/null 2>&1 \
      || echo "merge into $base failed; section files are in $WORK"
  fi
}

versions() {
  stamp "machine and versions"
  if [[ $SMOKE == 1 ]]; then echo "GBSD_GPU_SMOKE=1: tiny CPU run of this script's plumbing"; fi
  if [[ $SMOKE != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv || echo "nvidia-smi failed"
  fi
  "$PY" - <<'EOF' || echo "version probe failed"
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({type(e).__name__})"
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version() if cuda else None, "| triton", tv)
if cuda:
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"| sm_{p.major}{p.minor}", "|", p.multi_processor_count, "SMs |",
          round(p.total_memory / 2**30, 1), "GiB")
EOF
  uptime || true
}

install_wheels() {
  [[ $SMOKE == 1 ]] && return 0
  stamp "carried wheels (diffusers, open_clip, ftfy, wcwidth) -> /tmp/site"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/ carried: see bench/README.md (run with carry=[\".whl\"])"; exit 2
  fi
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || echo "wheel install failed"
  "$PY" -c 'import diffusers, open_clip, transformers; print("diffusers", diffusers.__version__, "open_clip",
open_clip.__version__, "transformers", transformers.__version__)' || echo "reference libraries do not import"
}
export PYTHONPATH=/tmp/site:$PWD

smoke_part() {
  stamp "SMOKE PART (<= 2 min)"
  rm -f "$WORK"/smoke-*.json
  if [[ $SMOKE != 1 ]]; then
    # the issue's crash items first, the Triton kernel cases (one JIT compile per variant) last
    stamp "CUDA test cases only (-k cuda; cap 40 s)"
    timeout --kill-after=5 40 "$PY" -m pytest -q -p no:cacheprovider -m "not fullsize" -k cuda -rfEs \
      tests/fast/test_attention.py tests/fast/test_apply.py tests/fast/test_step.py tests/fast/test_step_sdxl.py \
      tests/test_sampling.py \
      tests/fast/kernels > "$OUT/tests.log" 2>&1
    echo "tests rc=$? (124: cut at the cap)"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests.log" | tail -n 25
  fi
  # one warm-up (compiled / captured) step and one timed step of every configuration; real SD1.5 size for the
  # eager and graphed ones, the tiny stand-in for the compiled ones (a cold SD1.5 compile alone takes minutes)
  section smoke-eager 25 "${BENCH[@]}" "${SMOKE_SIZE[@]}" --steps 2 --repeat 1 --warmup 1 --parts step \
    --configs "$EAGER" --json "$WORK/smoke-eager.json"
  section smoke-compiled 40 "${BENCH[@]}" --tiny "${SMOKE_SIZE[@]}" --steps 2 --repeat 1 --warmup 1 --parts step \
    --configs "$COMPILED_OURS,$COMPILED_DIFFUSERS" --json "$WORK/smoke-compiled.json"
  merge_into smoke smoke.md "$WORK/smoke-eager.json" "$WORK/smoke-compiled.json"
  stamp "SMOKE SUMMARY (what broke)"
  "$PY" -m bench.check "$WORK"/smoke-*.json && echo "SMOKE OK" || echo "SMOKE FOUND FAILURES (above)"
}

keep() {  # keep LIST: LIST without the configurations that failed in this machine's smoke part
  if ls "$WORK"/smoke-*.json >/dev/null 2>&1; then "$PY" -m bench.check "$WORK"/smoke-*.json --keep "$1"; else
    echo "$1"; fi
}

full_part() {
  stamp "FULL PART (<= 9 min)"
  rm -f "$WORK"/full-*.json
  local eager compiled_ours compiled_diffusers
  eager=$(keep "$EAGER"); compiled_ours=$(keep "$COMPILED_OURS"); compiled_diffusers=$(keep "$COMPILED_DIFFUSERS")
  echo "configurations (after the smoke part): eager [$eager] compiled [$compiled_ours] [$compiled_diffusers]"
  section kernels 30 "${KERNELS[@]}" --json "$OUT/kernels.json"
  [[ -n $eager ]] && section batch 65 "${BENCH[@]}" "${FULL_SIZE[@]}" --batch "$BATCHES" --parts step \
    "${REPEAT[@]}" --configs "$eager" --json "$WORK/full-batch.json"
  [[ -n $eager ]] && section batch1 80 "${BENCH[@]}" "${FULL_SIZE[@]}" --batch 1 --parts step,loop,text,vae,e2e \
    "${REPEAT[@]}" --configs "$eager" --sweep fast --sweep-k 10 --sweep-layout 0.8 --sweep-independent measure \
    --json "$WORK/full-batch1.json"
  # compiled: a cold inductor compile of the SD1.5 step is measured as warmup_s; step and loop come before VAE/e2e
  [[ -n $compiled_ours ]] && section ours-compiled 115 "${BENCH[@]}" "${FULL_SIZE[@]}" --batch 1 \
    --parts step,loop,text,vae,e2e "${REPEAT[@]}" --configs "$compiled_ours" --json "$WORK/full-ours-compiled.json"
  [[ -n $compiled_diffusers ]] && section diffusers-compiled 90 "${BENCH[@]}" "${FULL_SIZE[@]}" --batch 1 \
    --parts step,loop,text,vae,e2e "${REPEAT[@]}" --configs "$compiled_diffusers" \
    --json "$WORK/full-diffusers-compiled.json"
  # SDXL base 1024^2: the 2.6B UNet is 13.5 TFLOP per CFG step (8.4x SD1.5 at 512^2); step then loop, eager first
  section sdxl 45 "${SDXL[@]}" --parts step,loop "${REPEAT[@]}" --repeat 3 --configs "$SDXL_EAGER" \
    --json "$WORK/full-sdxl.json"
  section sdxl-compiled 75 "${SDXL[@]}" --parts step,loop "${REPEAT[@]}" --repeat 3 --configs "$SDXL_COMPILED" \
    --json "$WORK/full-sdxl-compiled.json"
  merge_into results RESULTS-gpu.md "$WORK"/full-*.json
  "$PY" -m bench.check "$WORK"/full-*.json || true
}

max_part() {
  stamp "MAX-AUTOTUNE PART"
  section max 560 "${BENCH[@]}" "${FULL_SIZE[@]}" --batch 1 --parts step,loop "${REPEAT[@]}" \
    --configs "$MAX_CONFIGS" --json "$WORK/max.json"
  merge_into results-max RESULTS-gpu-max.md "$WORK/max.json"
}

versions
install_wheels
[[ $PART == smoke || $PART == all ]] && smoke_part
[[ $PART == full || $PART == all ]] && full_part
[[ $PART == max ]] && max_part
stamp "done"
exit 0
