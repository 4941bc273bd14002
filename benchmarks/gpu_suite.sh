#!/usr/bin/env bash
# The suite on a lent GPU machine (Python 3.12 with jax, flax, optax, orbax, torch preinstalled), from
# the repository root, with the wheels that image lacks in .whl/ (`bash ../shared/device/wheels.sh`).
#
#   bash benchmarks/gpu_suite.sh [BUDGET_S] [SUITE ARGS...]    # default 480 s, all parts
#
# First a 30-second check (the tiny train step and a profiler trace on the GPU): if the step
# fails, it stops at once (exit 3) instead of spending the budget on failing parts. Writes into
# $OUT (default /tmp/suite_out) at most five files, so that all of them come back: suite.md (every
# table), suite_log.txt (the console), check_log.txt, suite.tgz (the JSON reports, Markdown and
# logs) and profile.tgz (the jax.profiler traces, if they fit in 16 MiB).
set -uo pipefail
out=${OUT:-/tmp/suite_out}
budget=${1:-480}
shift || true
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "installing the wheels of .whl failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import jax, flax, optax, orbax.checkpoint, grain, torch; print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, jax.devices())'
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
