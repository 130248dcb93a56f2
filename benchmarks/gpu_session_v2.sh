#!/usr/bin/env bash
# Kernels v2 on Hopper (issue 29): everything the chip must measure, in ONE device call of at
# most 8 minutes (the device tool's 15 minutes a session include the machine's start):
#   bash benchmarks/gpu_session_v2.sh             # GPU machine
#   bash benchmarks/gpu_session_v2.sh --rehearse  # CPU machine (CI): the same steps, which
#                                                 # exit early or run their CPU smoke paths
#   bash benchmarks/gpu_session_v2.sh --plan      # print the steps and their caps, run nothing
#
# Steps, in the order of what matters most (each under its own cap, clamped to what is left
# of LONGVITA_SESSION_BUDGET, default 470 s; results written after every row):
#   1. preflight-deps, install (offline, --no-deps, the C++ extension without its CUDA
#      kernels: the pixel shuffle's CUDA kernel is not measured here and its compile was 40
#      of the 60 s the first session's build took), preflight-installed (every module and
#      script imports; the libstdc++ link check the first session fixed but never re-ran)
#   2. generate: `longvita generate` twice in one process on the GPU: cold and warm prefill
#      seconds, and whether a kernel's eager path imports torch._dynamo (fixed, not re-run)
#   3. attention: tune_attention.py --quick on both model shapes (packed 32K 40:8 D128
#      causal; InternViT 8 x 1025 16:16 D64 bidirectional), each variant with its table
#      configs, the default timed first and last; writes the winners' launch table
#   4. shuffle: bench_pixel_shuffle.py --quick --ln-only at 64 and 256 tiles (copy, the
#      two Triton forward kernels, eager, torch.compile in the same run)
#   5. prefill: bench_prefill.py --parts db --layers 48: (d) the CP model after its
#      warm-up fix, then (b) one try at 192K tokens (the target) of all 48 layers of
#      Long-VITA-14B chunk-prefilled and decoded
#   6. train: bench_train.py --policies all --quick (MFU per checkpointing policy; the
#      lead adds the flag: until then the step says so and the session goes on)
#   7. gpu-tests: the new kernels' GPU tests (2x rule at Qwen2.5-14B's widths), if time is left
# Caps: the first session's timings (2026-11-25, benchmarks/RESULTS.md) with margin, noted
# per step (x5 in the rehearsal, whose CI machine has 2 shared cores and budget 2400 s). Files in $OUT (the device tool brings back at most 8): session.log, summary.txt,
# tune_attention.jsonl, table/launch_table.json (a folder of its own: make_results reads every
# $OUT/*.json as benchmark rows), pixel_shuffle.json, prefill_db.json, train.json,
# generate.jsonl. Exit status 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
for arg in "$@"; do
  case $arg in
    --rehearse) mode=rehearse ;;
    --plan) mode=plan ;;
    *) echo "usage: bash benchmarks/gpu_session_v2.sh [--rehearse | --plan]" >&2; exit 2 ;;
  esac
done

dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
log="$dest/session.log"
summary="$dest/summary.txt"
budget=${LONGVITA_SESSION_BUDGET:-470}  # the brief: at most 480 s in one call
reserve=10                              # make_results and the summary
x=1  # cap multiplier: the rehearsal's CPU machine (2 shared cores in CI) builds and runs slower
if [ "$mode" = rehearse ]; then
  x=5
  budget=${LONGVITA_SESSION_BUDGET:-2400}
fi
failed=0
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$mode" = gpu ]; then
  export PIP_BREAK_SYSTEM_PACKAGES=1  # the lent image's Python is the system's
else
  unset TRITON_INTERPRET  # a user's shell: the CLI runs the CPU paths
fi
export LONGVITA_SKIP_CUDA=1  # the C++ extension only (see step 1)
unset LONGVITA_ATTENTION_VARIANT LONGVITA_SHUFFLE_LN_FWD  # the defaults, unless a step names one

# shellcheck source=benchmarks/session_steps.sh
. benchmarks/session_steps.sh
on_gpu=0  # the GPU's commands: run (gpu) or printed (plan)
if [ "$mode" = gpu ] || [ "$mode" = plan ]; then
  on_gpu=1
fi

if [ "$mode" = plan ]; then
  # the same step list, printed: name, cap, command (tests/test_gpu_session.py reads it)
  step() { local name=$1 cap=$2; shift 2; echo "step $name $cap $*"; return 0; }
  finish() { echo "budget $budget reserve $reserve"; exit 0; }
  say() { :; }
else
  : >"$log"
  : >"$summary"
fi

say "longvita GPU session v2, mode $mode, $(date -u +%FT%TZ), $(python --version 2>&1) at $(command -v python)"
[ "$mode" = gpu ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"

# 1. install offline (2026-11-25: preflight a few seconds, the build 60 s with CUDA kernels)
strict=()
[ "$mode" = rehearse ] && strict=(--strict)
if ! step preflight-deps $((30 * x)) python benchmarks/gpu_preflight.py deps "${strict[@]}"; then
  say "the machine lacks what the session needs (listed above): nothing measured"
  finish
fi
step install $((60 * x)) python -m pip install --no-deps --no-build-isolation --no-index -e . || finish
step preflight-installed $((40 * x)) python benchmarks/gpu_preflight.py installed

# 2. generate, cold and warm (2026-11-25: 7.5 s of prefill before the fix; model load ~10 s)
device=cuda
dtype=bfloat16
if ((!on_gpu)); then
  device=cpu
  dtype=float32
fi
step generate $((45 * x)) bash -c "set -o pipefail; python benchmarks/gpu_preflight.py generate --device $device --dtype $dtype | tee '$dest/generate.jsonl'"

# 3. the attention sweep (new: with --quick about 30 rows, one per variant and pass at its
# table configs, 2-4 s each with the compile; the script starts no row after 95 s). The
# baselines of bench_attention (cuDNN, FlexAttention, FA2) are not re-run: no time; the
# default variant timed in the same run is the baseline the variants must beat.
step attention $((110 * x)) python benchmarks/tune_attention.py --quick --budget-s 95 \
  --out "$dest/tune_attention.jsonl" --write-table "$dest/table/launch_table.json"

# 4. shuffle + LayerNorm (2026-11-25: the quick run with the projector about 40 s, most of
# it torch.compile; the LayerNorm table alone less)
step shuffle $((45 * x)) python benchmarks/bench_pixel_shuffle.py --quick --ln-only --out "$dest/pixel_shuffle.json"

# 5. prefill: (d) then (b) at 192K with 48 layers (2026-11-25: (b) with 4 layers prefilled
# 262K tokens in 6.9 s; 48 layers at 192K: about 50 s of causal attention at the measured
# 404 TFLOP/s plus 10 s of GEMMs, one try; model build and warm-up about 30 s)
prefill_args=(--parts db --layers 48 --b-tokens 196608 --quick)
((on_gpu)) || prefill_args=(--cpu-smoke --parts db --b-tokens 512)
step prefill $((150 * x)) python benchmarks/bench_prefill.py "${prefill_args[@]}" --out "$dest/prefill_db.json"

# 6. training-step policies (2026-11-25: the quick training run about 40 s)
if [ "$mode" = plan ] || python benchmarks/bench_train.py --help 2>/dev/null | grep -q -- "--policies"; then
  train_args=(--policies all --quick)
  ((on_gpu)) || train_args=(--policies all --cpu-smoke)
  step train $((75 * x)) python benchmarks/bench_train.py "${train_args[@]}" --out "$dest/train.json"
else
  say ""
  say "=== train: SKIPPED: benchmarks/bench_train.py has no --policies yet (the lead adds the MFU-per-policy mode)"
  echo "train: SKIPPED (bench_train.py has no --policies yet)" >>"$summary"
fi

# 7. the new kernels on the chip, with what is left
if ((on_gpu)); then
  step gpu-tests $((40 * x)) python -m pytest -q -p no:cacheprovider tests/test_decoder_kernels.py -k gpu -rfEs
else
  TRITON_INTERPRET=0 step collect $((60 * x)) python -m pytest --collect-only -qq -p no:cacheprovider \
    tests/test_decoder_kernels.py tests/test_attention_variants.py benchmarks
fi

finish
