#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (device time is scarce):
# build with the CUDA kernels, the whole test suite (the GPU tests run there), then every
# benchmark. Logs and JSON go to $OUT when set (the device tool), else benchmarks/results.
#   bash benchmarks/gpu_session.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
quick=${1:-}
export PYTHONUNBUFFERED=1

python -m pip install -q --no-build-isolation -e '.[test]' 2>&1 | tail -3
log="$dest/session.log"  # one log: the device tool brings back at most 8 files
python -m longvita info 2>&1 | tee "$log"
python -m pytest tests -q 2>&1 | tee -a "$log" | tail -15
for b in attention lm_head pixel_shuffle ring; do
  python "benchmarks/bench_$b.py" $quick --out "$dest/$b.json" 2>&1 | tee -a "$log" | tail -40
done
# the whole model: Table 4 and the CP model on 8 layers, then the full 48 layers' longest
# chunked prefill and decode speed (the longest runs: each try prefills the whole prompt)
python benchmarks/bench_prefill.py $quick --parts ad --layers 8 --out "$dest/prefill_ad.json" 2>&1 | tee -a "$log" | tail -40
python benchmarks/bench_prefill.py $quick --parts bc --out "$dest/prefill_bc.json" 2>&1 | tee -a "$log" | tail -20
python benchmarks/make_results.py "$dest"/*.json > "$dest/RESULTS-tables.md"
