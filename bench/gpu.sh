#!/usr/bin/env bash
# The prepared script for a lent H100/H200 (bench/README.md, "On a lent GPU"). A lease is 15 minutes of device time
# with the machine's start (a minute or two) and 10 minutes at most per command, so a plan is ONE call of at most
# 540 s, leaving time for one retry, and it returns numbers even when it is cut:
#
#   - every section is its own process with its own cap (timeout; pytest gets SIGINT, so it prints its summary), and
#     a section is never fatal: the next one starts when it ends, fails or is cut;
#   - the call has a deadline (GBSD_GPU_BUDGET, 540 s): a section's cap is cut to the time left before it (less the
#     final merge's reserve), and a section with too little left is skipped and says so;
#   - each bench section rewrites its JSON (and markdown table) after every measurement, and prints each figure to
#     the log as it is measured, so a cut section keeps what it measured;
#   - after every section, everything measured so far is packed into $OUT/measured.tgz (the device tool brings back
#     at most 8 files: gpu.log, tests.log, measured.tgz, results.json, RESULTS-gpu.md come back, even from a cut call);
#   - diffusers comes first in every list of configurations: a sticky CUDA error of ours cannot cost the baseline.
#
# Before the call, here: `python -m bench.wheels` (downloads exactly the wheels this script installs into .whl/, and
# checks them). The call: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=570), then give_back.
#
#   GBSD_GPU_CALL=1 (default)  versions + wheels; the CUDA tests without the Triton variants; SD1.5 512² fp16 batch 1
#                              step + loop of diffusers, graphs, fast, eager (+ graphs/fast without channels-last); the
#                              headline graphs+compile (cold compile included); diffusers+compile; batch 4 and 8 steps
#                              of diffusers and graphs; SDXL 1024² eager diffusers, graphs, fast (4 steps);
#                              cudnn.benchmark on for diffusers, graphs, fast; merge
#   GBSD_GPU_CALL=2            what call 1 cannot hold (a later lease): SDXL graphs+compile and diffusers+compile (cold
#                              compiles of the 2.6B UNet), then SD1.5 fast+compile
#   GBSD_GPU_CALL=3            the Triton kernels (tests, bench.kernels, fast+triton), text / VAE / e2e, the K=10 sweep,
#                              then SD-Turbo 512² 1 and 4 steps end to end (images/s, shares; bench/few_step.py)
#
# Section caps and the seconds planned for each: the CAP and PLAN tables below (bench/README.md explains each
# estimate). GBSD_GPU_CAPS="name=seconds ..." overrides caps. Without a GPU, `GBSD_GPU_SMOKE=1 PY=/path/to/python
# bash bench/gpu.sh` runs the same plan tiny on the CPU (no wheels, no compile: compiled configurations are stood in
# by their eager twins), to check its plumbing (tests/bench/test_gpu_sh.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gbsd-gpu-out}
WORK=${GBSD_GPU_WORK:-/tmp/gbsd-gpu-work}
CALL=${GBSD_GPU_CALL:-1}
SMOKE=${GBSD_GPU_SMOKE:-0}
BUDGET=${GBSD_GPU_BUDGET:-540}
PY=${PY:-python3}
SITE=/tmp/site  # where the carried wheels are installed (the device README's recipe)
RESERVE=20      # seconds kept for the final merge
GRACE=10        # a process that ignores its signal is killed this long after it
MIN_SECTION=20  # a section with less than this left is skipped
case $CALL in 1|2|3) ;; *) echo "GBSD_GPU_CALL must be 1, 2 or 3, got '$CALL'"; exit 2;; esac
mkdir -p "$OUT" "$WORK"; rm -f "$WORK"/*
exec > >(tee -a "$OUT/gpu.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

# Seconds: each section's cap, and the time planned for it (how each was estimated: bench/README.md).
declare -A CAP=(
  [setup]=40 [tests]=45 [sd15-eager]=80 [sd15-graphs-compile]=140 [sd15-diffusers-compile]=120 [sd15-batch]=40
  [sdxl-eager]=70 [sd15-cudnn]=35
  [sdxl-graphs-compile]=240 [sdxl-diffusers-compile]=220 [sd15-fast-compile]=110
  [tests-triton]=90 [kernels]=40 [sd15-triton]=60 [sd15-parts]=80 [sd15-sweep]=90 [turbo-few-step]=60
)
declare -A PLAN=(
  [setup]=20 [tests]=35 [sd15-eager]=60 [sd15-graphs-compile]=105 [sd15-diffusers-compile]=90 [sd15-batch]=30
  [sdxl-eager]=55 [sd15-cudnn]=25
  [sdxl-graphs-compile]=200 [sdxl-diffusers-compile]=180 [sd15-fast-compile]=90
  [tests-triton]=70 [kernels]=30 [sd15-triton]=40 [sd15-parts]=60 [sd15-sweep]=60 [turbo-few-step]=45
)
for kv in ${GBSD_GPU_CAPS:-}; do CAP[${kv%%=*}]=${kv#*=}; done

# What each section runs: the real sizes on the GPU; tiny CPU stand-ins of the same plan for the plumbing check.
if [[ $SMOKE == 1 ]]; then
  SD15=("$PY" -m bench --arch sd15 --tiny --device cpu --dtype fp32 --threads 1 --size 64 --steps 2)
  SDXL=("$PY" -m bench --arch sdxl --tiny --device cpu --dtype fp32 --threads 1 --size 64 --steps 2)
  TIMES=(--repeat 1 --warmup 1 --loop-repeat 1 --e2e-repeat 0); SDXL_TIMES=("${TIMES[@]}"); BATCHES=1,2
  # no compile in a CPU check: each compiled configuration is stood in by its eager twin
  GRAPHS_COMPILE=fast; DIFFUSERS_COMPILE=diffusers; FAST_COMPILE=fast; FAST_TRITON=fast
  KERNELS=(env TRITON_INTERPRET=1 "$PY" -m bench.kernels --tiny --device cpu --repeat 1)
  SWEEP=(--sweep fast --sweep-k 2 --sweep-steps 2 --sweep-independent measure)
  # the same pytest commands on one quick file each (on a CPU every CUDA case skips anyway)
  TESTS1=(tests/fast/test_step_lifecycle.py); TESTS3=(tests/fast/kernels)
  FEW=("$PY" -m bench few-step --tiny --device cpu --dtype fp32 --threads 1 --size 64 --steps 1,4 --batch 1 --repeat 1)
else
  SD15=("$PY" -m bench --arch sd15 --device cuda --dtype fp16 --size 512 --steps 50 --cfg 7.5)
  # SDXL: 4 steps (it/s over the loop), 3 timed steps; a compiled configuration's first step is its cold compile
  SDXL=("$PY" -m bench --arch sdxl --device cuda --dtype fp16 --size 1024 --steps 4 --cfg 7.5)
  TIMES=(--repeat 10 --warmup 2 --loop-repeat 2 --e2e-repeat 2); SDXL_TIMES=(--repeat 3 --warmup 1 --loop-repeat 1)
  BATCHES=4,8
  GRAPHS_COMPILE=graphs+compile; DIFFUSERS_COMPILE=diffusers+compile; FAST_COMPILE=fast+compile
  FAST_TRITON=fast+triton
  KERNELS=("$PY" -m bench.kernels --device cuda --dtype fp16)
  SWEEP=(--sweep graphs --sweep-k 10 --sweep-layout 0.8 --sweep-independent measure)
  # the crash items' file first; every CUDA case but the Triton kernels' variants (each a JIT compile: call 3)
  TESTS1=(tests/fast/test_step_lifecycle.py tests/fast/test_step.py tests/fast/test_step_sdxl.py
          tests/fast/test_attention.py tests/fast/test_apply.py tests/test_sampling.py)
  TESTS3=(tests/fast/kernels tests/fast/test_apply.py)
  # SD-Turbo-shaped (SD 2.1's networks), its card's recipe: Euler a, trailing, guidance off; ours vs diffusers
  FEW=("$PY" -m bench few-step --device cuda --dtype fp16 --size 512 --steps 1,4 --batch 1,4 --repeat 5)
fi

pack() {  # everything measured so far -> $OUT/measured.tgz (renamed into place: a cut call never leaves half a tar)
  tar -czf "$OUT/.measured.tgz" -C "$WORK" . && mv -f "$OUT/.measured.tgz" "$OUT/measured.tgz" \
    || echo "packing $WORK failed"
}

cap_for() {  # cap_for NAME: the section's cap, cut to the call's time left (0: skip it)
  local name=$1 left
  left=$(( T0 + BUDGET - RESERVE - GRACE - $(date +%s) ))
  if (( left < MIN_SECTION )); then echo 0
  elif (( left < CAP[$name] )); then echo "$left"
  else echo "${CAP[$name]}"; fi
}

section() {  # section NAME SIGNAL command... : one process under its cap (SIGNAL at the cap, KILL GRACE s later);
  # its output goes to the log, or to SECTION_LOG when that is set
  local name=$1 sig=$2 cap rc; shift 2
  cap=$(cap_for "$name")
  if (( cap == 0 )); then
    stamp "section $name SKIPPED: under ${MIN_SECTION}s of the call's ${BUDGET}s left"; return
  fi
  stamp "section $name (cap ${cap}s, planned ${PLAN[$name]}s): $*"
  if [[ -n ${SECTION_LOG:-} ]]; then
    timeout -s "$sig" --kill-after=$GRACE "$cap" "$@" > "$SECTION_LOG" 2>&1
  else
    timeout -s "$sig" --kill-after=$GRACE "$cap" "$@"
  fi
  rc=$?
  if (( rc == 124 || rc == 137 )); then stamp "section $name: CUT at its ${cap}s cap (rc=$rc)"; else
    stamp "section $name rc=$rc"; fi
  pack
}

bench() {  # bench NAME command... : a bench section writing $WORK/NAME.json and NAME.md as it measures
  local name=$1; shift
  section "$name" TERM "$@" --json "$WORK/$name.json" --markdown "$WORK/$name.md"
}

setup() {  # not one process: each step has its own timeout, all within the setup's cap
  stamp "section setup: machine, versions, carried wheels (cap ${CAP[setup]}s, planned ${PLAN[setup]}s)"
  local deadline=$(( $(date +%s) + CAP[setup] ))
  left() { local s=$(( deadline - $(date +%s) )); echo $(( s > 5 ? s : 5 )); }
  {
    [[ $SMOKE == 1 ]] && echo "GBSD_GPU_SMOKE=1: the plan's plumbing, tiny, on the CPU"
    echo "GBSD_GPU_CALL=$CALL, budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [[ $SMOKE != 1 ]]; then
      timeout 20 nvidia-smi --format=csv \
        --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        || echo "nvidia-smi failed"
    fi
    uptime || true
  } | tee "$WORK/versions.txt"
  if [[ $SMOKE != 1 ]]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      timeout "$(left)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || echo "wheel install failed"
      export PYTHONPATH=$SITE:$PWD
      # each carried wheel's needs against what this machine has (versions printed), then the imports
      timeout "$(left)" "$PY" -m bench.wheels --installed "$SITE" | tee -a "$WORK/versions.txt" \
        || echo "WHEELS NOT READY: the diffusers configurations will fail; ours still run"
    else
      echo "no .whl/ carried (python -m bench.wheels here first, then carry=[\".whl\"]): diffusers will be missing"
      export PYTHONPATH=$PWD
    fi
  fi
  timeout "$(left)" "$PY" - <<'EOF' 2>&1 | tee -a "$WORK/versions.txt"
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
  stamp "section setup done"
  pack
}

tests() {  # tests NAME -k-EXPRESSION FILES... : pytest under SIGINT at its cap, so it still prints its summary
  local name=$1 expr=$2; shift 2
  SECTION_LOG=$WORK/$name.log section "$name" INT "$PY" -m pytest -q -p no:cacheprovider -m "not fullsize" -k "$expr" \
    -rfEs --durations=5 "$@"
  [[ -f $WORK/$name.log ]] || return  # skipped
  grep -E "passed|failed|error|FAILED|ERROR|KeyboardInterrupt|skipped|no tests ran" "$WORK/$name.log" | tail -n 25
  cp "$WORK/$name.log" "$OUT/$name.log"
}

merge() {  # within the reserve left at the end of the budget (10 s at least)
  stamp "merge"
  local inputs=() left
  for f in "$WORK"/sd*.json; do [[ -s $f ]] && inputs+=("$f"); done
  if (( ${#inputs[@]} )); then
    left=$(( T0 + BUDGET - 5 - $(date +%s) ))
    timeout $(( left > 10 ? left : 10 )) "$PY" -m bench.merge "$OUT/results.json" "${inputs[@]}" \
      --markdown "$OUT/RESULTS-gpu.md" || echo "merge failed; the section files are in measured.tgz"
    timeout 10 "$PY" -m bench.check "${inputs[@]}"
  fi
  pack
}

call1() {
  tests tests "cuda and not triton" "${TESTS1[@]}"
  bench sd15-eager "${SD15[@]}" --batch 1 --parts step,loop "${TIMES[@]}" \
    --configs diffusers,graphs,fast,eager,graphs-nchw,fast-nchw
  # the headline: our graph around our compiled step; its cold compile is its warmup_s
  bench sd15-graphs-compile "${SD15[@]}" --batch 1 --parts step,loop "${TIMES[@]}" --configs "$GRAPHS_COMPILE"
  bench sd15-diffusers-compile "${SD15[@]}" --batch 1 --parts step,loop "${TIMES[@]}" --configs "$DIFFUSERS_COMPILE"
  bench sd15-batch "${SD15[@]}" --batch "$BATCHES" --parts step "${TIMES[@]}" --configs diffusers,graphs
  bench sdxl-eager "${SDXL[@]}" --batch 1 --parts step,loop "${SDXL_TIMES[@]}" --configs diffusers,graphs,fast
  # cudnn.benchmark is set once per process (cuDNN caches its per-shape choice), so "on" is its own section
  bench sd15-cudnn "${SD15[@]}" --batch 1 --parts step "${TIMES[@]}" --cudnn-benchmark on \
    --configs diffusers,graphs,fast
}

call2() {
  bench sdxl-graphs-compile "${SDXL[@]}" --batch 1 --parts step,loop "${SDXL_TIMES[@]}" --configs "$GRAPHS_COMPILE"
  bench sdxl-diffusers-compile "${SDXL[@]}" --batch 1 --parts step,loop "${SDXL_TIMES[@]}" \
    --configs "$DIFFUSERS_COMPILE"
  bench sd15-fast-compile "${SD15[@]}" --batch 1 --parts step,loop "${TIMES[@]}" --configs "$FAST_COMPILE"
}

call3() {
  tests tests-triton "cuda and (triton or kernel)" "${TESTS3[@]}"
  section kernels TERM "${KERNELS[@]}" --json "$WORK/kernels.json"
  bench sd15-triton "${SD15[@]}" --batch 1 --parts step,loop "${TIMES[@]}" --configs "diffusers,$FAST_TRITON"
  bench sd15-parts "${SD15[@]}" --batch 1 --parts text,vae,e2e "${TIMES[@]}" --configs diffusers,fast,graphs
  bench sd15-sweep "${SD15[@]}" --batch 1 --configs none "${SWEEP[@]}" "${TIMES[@]}"
  # its own JSON format (not merged: the merge reads sd*.json), rewritten after each steps x batch
  section turbo-few-step TERM "${FEW[@]}" --json "$WORK/turbo-few-step.json"
}

setup
"call$CALL"
merge
stamp "done (${BUDGET}s budget)"
exec >&- 2>&-
wait "$TEE"
exit 0
