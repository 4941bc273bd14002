#!/usr/bin/env bash
# The suite on a lent GPU machine (Python 3.12 with jax, flax, optax, orbax, torch preinstalled), from
# the repository root, with the wheels that image lacks in .whl/ (`bash ../shared/device/wheels.sh`).
#
#   bash benchmarks/gpu_suite.sh [BUDGET_S] [SUITE ARGS...]    # default 480 s, all parts
#   bash benchmarks/gpu_suite.sh runA | runB | runC             # the runs of gpu-performance-plan §6
#
# Default mode: first a 30-second check (the tiny train step and a profiler trace on the GPU): if the
# step fails, it stops at once (exit 3) instead of spending the budget on failing parts. Writes into
# $OUT (default /tmp/suite_out) at most five files, so that all of them come back: suite.md (every
# table), suite_log.txt (the console), check_log.txt, suite.tgz (the JSON reports, Markdown and
# logs) and profile.tgz (the jax.profiler traces, if they fit in 16 MiB).
#
# runA / runB / runC (docs/performance.md "GPU runs A/B/C"): each step under `timeout`, all within
# RUN_BUDGET seconds (default 540; a step is skipped when under 20 s are left), at most 8 files in
# $OUT, the console in $OUT/runX_log.txt. ITERS (default 20) sets --iters. DRY_RUN=1 prints the
# steps instead of running them (no wheels, no GPU: the tests check the plan that way).
#   runA  baseline truth: CSL + UniMatch R101 OS16 513 8+8 bf16 with the PyTorch reference in the same
#         run (base.json: ms/step back to back and synced, dispatch ms, the bf16 peak of this process),
#         the HLO dump of that compile (hlo.tgz: after-optimisation HLO + buffer assignment; hlo_stats.json),
#         a trace of 3 CSL steps with command buffers kept on (prof.json, prof_summary.json), and
#         dilated_conv (dilated.json).
#   runB  XLA flags, one cold process per variant, CSL only: default; command buffers off; autotune
#         level 1; the update-free command-buffer update mode (if jaxlib accepts a value: probed first);
#         the experimental cuDNN conv fusion (last, timeout 150). flags.json / flags.md: compile s,
#         ms/step, ms/step synced, dispatch ms per variant; variant_*.json the reports.
#   runC  after the code changes: runA's first step again with `--kernels reference fast` (base.json: the
#         plain JAX formulations and the train-time kernels in one process), then torch.compile of the
#         PyTorch bf16 steps (torch_compile.json; RUNC_TORCH_COMPILE=0 skips it), then the suite's
#         part 4 (data wait) with what is left (suite_part4.md, suite_part4.tgz).
set -uo pipefail
out=${OUT:-/tmp/suite_out}
mkdir -p "$out"
dry=${DRY_RUN:-}

setup() {  # the wheels, PYTHONPATH, what the machine is
  export PYTHONUNBUFFERED=1
  [ -n "$dry" ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "installing the wheels of .whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c 'import jax, flax, optax, orbax.checkpoint, grain, torch; print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, jax.devices())'
}

# ---- runs A, B, C ---------------------------------------------------------------------------------
start_s=$SECONDS
budget=${RUN_BUDGET:-540}
iters=${ITERS:-20}
log=/dev/null

left() { echo $((budget - SECONDS + start_s)); }

step() {  # CAP CMD...: CMD under `timeout min(CAP, time left)`, its output appended to $log
  local cap=$1 t rc
  shift
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ -n "$dry" ]; then echo "[dry] timeout $t $*"; return 0; fi
  if [ "$t" -lt 20 ]; then echo "skipped (budget spent): $*" | tee -a "$log"; return 124; fi
  echo "[$((SECONDS - start_s)) s] timeout $t $*" | tee -a "$log"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "[$((SECONDS - start_s)) s] exit $rc" | tee -a "$log"
  return "$rc"
}

probe() {  # FLAGS: does this jaxlib accept the flags (an unknown flag or value aborts the parse)?
  if [ -n "$dry" ]; then echo "[dry] probe XLA_FLAGS=$1"; return 0; fi
  XLA_FLAGS="$1" timeout 60 python3 -c "import jax; jax.devices()" >/dev/null 2>&1
}

pack_hlo() {  # DIR TGZ: after-optimisation HLO + buffer assignments; over 15 MB, the largest module's only
  local dir=$1 tgz=$2 big stem
  if [ -n "$dry" ]; then echo "[dry] pack $dir -> $tgz"; return 0; fi
  [ -d "$dir" ] || { echo "no HLO dump in $dir" | tee -a "$log"; return 1; }
  (cd "$dir" && tar czf "$tgz" -- *after_optimizations.txt *after_optimizations-buffer-assignment.txt)
  if [ "$(stat -c %s "$tgz")" -ge 15000000 ]; then
    big=$(cd "$dir" && ls -S -- *after_optimizations.txt | head -1)
    stem=${big%after_optimizations.txt}
    (cd "$dir" && tar czf "$tgz" -- "$big" "${stem}after_optimizations-buffer-assignment.txt")
    [ "$(stat -c %s "$tgz")" -ge 15000000 ] && (cd "$dir" && tar czf "$tgz" -- "$big")
    echo "hlo.tgz: only $big (the whole dump is over 15 MB)" | tee -a "$log"
  fi
  ls -la "$tgz" | tee -a "$log"
}

base_step() {  # the same-process JAX vs PyTorch comparison (runs A and C); $1: extra train_step args
  step "${BASE_CAP:-330}" python3 -m benchmarks.train_step --method csl unimatch --torch --iters "$iters" \
    --compilation-cache "$S/c" "$@" --out "$out/base.json"
  [ -n "$dry" ] || mv -f "$out/base.json.torch.json" "$S/" 2>/dev/null  # its rows are in base.json
}

runA() {
  base_step --hlo-dump "$S/hlo"
  step 150 python3 -m benchmarks.train_step --method csl --warmup 2 --iters 5 --profile-steps 3 \
    --profile-dir "$S/p" --compilation-cache "$S/c" --out "$out/prof.json"
  step 60 python3 -m benchmarks.profile_summary "$S/p/csl_bfloat16_os16_513" --steps 3 --out "$out/prof_summary.json"
  pack_hlo "$S/hlo" "$out/hlo.tgz" && step 40 python3 -m benchmarks.hlo_stats "$out/hlo.tgz" --out "$out/hlo_stats.json"
  step 60 python3 -m benchmarks.dilated_conv --sizes 33 --channels 512 --dilations 1 2 --out "$out/dilated.json"
}

runB() {
  local update="" value labels=() caps=() flags=() i compare=()
  for value in NEVER_UPDATE CAPTURE_CMD_NEVER_UPDATE; do
    if probe "--xla_gpu_command_buffer_update_mode=$value"; then update="--xla_gpu_command_buffer_update_mode=$value"; break; fi
  done
  [ -z "$update" ] && echo "no update-free --xla_gpu_command_buffer_update_mode value accepted: variant skipped" | tee -a "$log"
  labels+=(default);     caps+=(120); flags+=("")
  labels+=(no_cmdbuf);   caps+=(120); flags+=("--xla_gpu_enable_command_buffer=")
  labels+=(autotune1);   caps+=(110); flags+=("--xla_gpu_autotune_level=1")
  if [ -n "$update" ]; then labels+=(update_free); caps+=(110); flags+=("$update"); fi
  labels+=(conv_fusion); caps+=(150); flags+=("--xla_gpu_experimental_enable_conv_fusion=true")
  for i in "${!labels[@]}"; do
    step "${caps[$i]}" python3 -m benchmarks.train_step --method csl --iters "$iters" --xla-flags="${flags[$i]}" \
      --out "$out/variant_${labels[$i]}.json"
    compare+=("${labels[$i]}=$out/variant_${labels[$i]}.json")
  done
  if [ -n "$dry" ]; then echo "[dry] compare ${compare[*]}"; return 0; fi
  python3 -m benchmarks.train_step --compare "${compare[@]}" --out "$out/flags.json" | tee "$out/flags.md" | tee -a "$log"
}

runC() {  # before / after of the train-time kernels in one process (4 compiles), then the rest if time is left
  BASE_CAP=420 base_step --kernels reference fast
  if [ "${RUNC_TORCH_COMPILE:-1}" != 0 ] && [ "$(left)" -gt 150 ]; then
    step 200 python3 -m benchmarks.torch_reference --method csl unimatch --dtype bfloat16 --modes compile \
      --iters "$iters" --out "$out/torch_compile.json"
  fi
  if [ "$(left)" -gt 150 ]; then
    step "$(left)" python3 -m benchmarks.suite --budget-s "$(($(left) - 20))" --parts 4 --out "$S/suite"
    [ -n "$dry" ] && return 0
    cp "$S/suite/suite.md" "$out/suite_part4.md" 2>/dev/null
    tar czf "$out/suite_part4.tgz" -C "$S" --exclude=suite/xla_cache --exclude='suite/train_run/data' \
      --exclude='*/checkpoints' --exclude='*/best' suite
  fi
}

case "${1:-}" in
  runA | runB | runC)
    mode=$1
    log="$out/${mode}_log.txt"
    [ -n "$dry" ] && log=/dev/null
    setup 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
    [ -n "$dry" ] || export PYTHONPATH=/tmp/site:$PWD
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
    S=$(mktemp -d)
    start_s=$SECONDS
    "$mode"
    [ -n "$dry" ] || ls -la "$out" | tee -a "$log"
    exit 0
    ;;
esac

# ---- default: the whole suite -----------------------------------------------------------------------
budget=${1:-480}
shift || true
setup
python3 -m benchmarks.train_step --tiny --method csl --dtype bfloat16 --profile-dir /tmp/check_profile \
  --out /tmp/check.json >"$out/check_log.txt" 2>&1 || { tail -60 "$out/check_log.txt"; exit 3; }
python3 -m benchmarks.profile_summary /tmp/check_profile/csl_bfloat16_os8_33 --top 8 >>"$out/check_log.txt" 2>&1
tail -25 "$out/check_log.txt"
v2_start=$SECONDS; timeout 150 python3 -m benchmarks.train_step --method unimatch_v2 --encoder small --crop 518 --labeled 16 --unlabeled 16 --dtype bfloat16 --warmup 2 --iters 5 --out /tmp/v2_step.json 2>&1 | tee -a "$out/check_log.txt" | tail -3; budget=$((budget - SECONDS + v2_start))  # UniMatch V2 ViT-S step (about 1 min, estimated), deducted from the suite budget
python3 -m benchmarks.suite --budget-s "$budget" --out /tmp/suite "$@" 2>&1 | tee "$out/suite_log.txt"
status=${PIPESTATUS[0]}
cp /tmp/suite/suite.md "$out/" 2>/dev/null
tar czf "$out/suite.tgz" -C /tmp --exclude=suite/xla_cache --exclude=suite/profile --exclude='suite/train_run/data' \
  --exclude='*/checkpoints' --exclude='*/best' suite
tar czf /tmp/profile.tgz -C /tmp suite/profile check_profile 2>/dev/null
[ "$(stat -c %s /tmp/profile.tgz)" -lt 16000000 ] && cp /tmp/profile.tgz "$out/"
ls -la "$out"
exit "$status"
