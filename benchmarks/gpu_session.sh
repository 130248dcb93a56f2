#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in ONE device call (device time is scarce):
#   bash benchmarks/gpu_session.sh            # GPU machine: build, every benchmark (quick cases), then the suite
#   bash benchmarks/gpu_session.sh --bench    # GPU machine: build and benchmarks only
#   bash benchmarks/gpu_session.sh --tests    # GPU machine: build and the test suite only (a second call)
#   bash benchmarks/gpu_session.sh --full     # GPU machine: every benchmark case (longer)
#   bash benchmarks/gpu_session.sh --rehearse # CPU machine (CI): the same install, imports and CLI, no measurements
#
# The lent machine is offline and its Python is what it is (numpy 2.5, no PyAV): nothing is
# downloaded and nothing is up- or downgraded. In order, each step under its own timeout
# (a hung step cannot eat the budget; LONGVITA_SESSION_BUDGET seconds in all, default 560):
#   1. preflight: every module and build tool the session needs, named if missing (stops here if so)
#   2. pip install --no-deps --no-build-isolation --no-index -e .  (the CUDA extension builds
#      against the machine's torch; if its compile fails, again without it so Triton still runs)
#   3. every longvita module and benchmark script imports with PyAV blocked; the extension is built
#   4. python -m longvita info; longvita generate (CPU, and on the GPU in bf16)
#   5. every benchmarks/bench_*.py under its own cap (what each took on an H100 on 2026-11-25,
#      with margin), JSON per benchmark rewritten after every row
#      (rehearsal: the same commands, which exit early without CUDA, and bench_ring --dry-run)
#   6. GPU: the test suite with the time left (GPU tests run; video tests skip without PyAV).
#      On 2026-11-25 on an H100 machine the suite ran past 240 s, the benchmarks took about
#      270 s and the build 60 s: when the first call runs out, `--tests` in a second call finishes it.
#      rehearsal: pytest --collect-only (every test module imports), no test runs
#   7. make_results.py turns the JSON into tables, appended to session.log
# Results go to $OUT when set (the device tool brings that folder back), else benchmarks/results:
#   session.log (everything, appended as it runs), summary.txt (one line per step),
#   <benchmark>.json (at most 8 files: the device tool's limit). Exit status 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
bench_args=(--quick)
run_bench=1
run_tests=1
cap_scale=1
for arg in "$@"; do
  case $arg in
    --rehearse) mode=rehearse ;;
    --full) bench_args=(); cap_scale=4 ;;
    --quick) bench_args=(--quick) ;;
    --bench) run_tests=0 ;;
    --tests) run_bench=0 ;;
    *) echo "usage: bash benchmarks/gpu_session.sh [--quick|--full] [--bench|--tests] | --rehearse" >&2; exit 2 ;;
  esac
done

dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
log="$dest/session.log"
summary="$dest/summary.txt"
: >"$log"
: >"$summary"
budget=${LONGVITA_SESSION_BUDGET:-560}  # the device tool stops a command at 600 s
reserve=20                              # kept for make_results and the summary
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$mode" = gpu ]; then
  export PIP_BREAK_SYSTEM_PACKAGES=1  # the lent image's Python is the system's; nothing else lives there
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH  # setup.py builds the CUDA kernels only where it finds nvcc
  fi
else
  unset TRITON_INTERPRET  # a user's shell: the CLI runs the CPU reference paths
fi
failed=0

# say, step (NAME CAP COMMAND...: one capped step) and finish (tables, summary, exit status)
# shellcheck source=benchmarks/session_steps.sh
. benchmarks/session_steps.sh

say "longvita GPU session, mode $mode, $(date -u +%FT%TZ), $(python --version 2>&1) at $(command -v python)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"

# 1. everything needed is there (the rehearsal also holds the package's requirements to it)
strict=()
[ "$mode" = rehearse ] && strict=(--strict)
if ! step preflight-deps 60 python benchmarks/gpu_preflight.py deps "${strict[@]}"; then
  say "the machine lacks what the session needs (listed above): nothing measured"
  finish
fi

# 2. install offline against the machine's torch
pip_install=(python -m pip install --no-deps --no-build-isolation --no-index -e .)
if ! step install 300 "${pip_install[@]}"; then
  if [ "$mode" = gpu ]; then
    LONGVITA_SKIP_CUDA=1 step install-without-cuda-kernels 150 "${pip_install[@]}" || finish
  else
    finish
  fi
fi

# 3. every module the run imports, without PyAV
step preflight-installed 90 python benchmarks/gpu_preflight.py installed

# 4. the command line (the rehearsal insists on the `longvita` entry point; the GPU machine's
# scripts folder may not be on PATH)
cli=(longvita)
if [ "$mode" = gpu ] && ! command -v longvita >/dev/null; then
  cli=(python -m longvita)
fi
step info 60 python -m longvita info
step generate-cpu 120 "${cli[@]}" generate --max-new-tokens 2
if [ "$mode" = gpu ]; then
  step generate-cuda 120 "${cli[@]}" generate --device cuda --dtype bfloat16 --max-new-tokens 8 --json
fi

# 5. benchmarks first: the measurements are what a lent GPU is for. Each cap is about twice
# what the quick cases took on an H100 (2026-11-25), Triton compiles included.
declare -A bench_cap=([attention]=110 [lm_head]=50 [pixel_shuffle]=80 [prefill]=100 [ring]=60 [train]=80
                      [transformers]=120)  # transformers: not yet timed on a GPU (4 models built, Triton compiles)
if ((run_bench)); then
  for b in benchmarks/bench_*.py; do
    name=$(basename "$b" .py)
    name=${name#bench_}
    step "bench-$name" $((${bench_cap[$name]:-60} * cap_scale)) python "$b" "${bench_args[@]}" --out "$dest/$name.json"
  done
  if [ "$mode" = rehearse ]; then  # JSON from a real script for make_results, without a GPU
    step bench-ring-model 60 python benchmarks/bench_ring.py --dry-run --quick --out "$dest/ring_model.json"
  fi
fi

# 6. tests with the time left
if ((run_tests)); then
  if [ "$mode" = gpu ]; then
    # 8 workers: more ran the GPU out of memory when the large GPU tests met (2026-11-25)
    step tests 420 python -m pytest tests -q -p no:cacheprovider -n "${LONGVITA_TEST_WORKERS:-8}" -rfEs --durations=10
  else  # no interpreter here (numpy >= 2.4): collection imports every test and benchmark module
    TRITON_INTERPRET=0 step collect 120 python -m pytest --collect-only -qq -p no:cacheprovider tests benchmarks
  fi
fi

# 7. tables
finish
