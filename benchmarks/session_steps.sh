# Shared by the GPU session scripts (gpu_session.sh, gpu_session_v2.sh): sourced, not run.
# The sourcing script sets: mode (gpu | rehearse), budget and reserve (seconds), log,
# summary and dest (paths), failed=0; these functions read and update them.

say() { echo "$*" | tee -a "$log"; }

# step NAME CAP_SECONDS COMMAND...: run under `timeout` (capped by what is left of the budget),
# output appended to the log as it comes, one line in the summary.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - reserve - SECONDS))
  ((cap > left)) && cap=$left
  if ((cap < 5)); then
    echo "$name: SKIPPED (session budget spent)" | tee -a "$summary" "$log"
    failed=1
    return 124
  fi
  say ""
  say "=== $name (timeout ${cap}s, at ${SECONDS}s): $*"
  local t0=$SECONDS rc
  # SIGINT first: pytest prints its summary, the benchmarks keep the JSON they wrote
  timeout -s INT -k 15 "$cap" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    echo "$name: ok (${took}s)" >>"$summary"
  elif ((rc == 124 || rc == 137 || rc == 130)); then
    echo "$name: TIMED OUT after ${took}s (cap ${cap}s)" >>"$summary"
    failed=1
  else
    echo "$name: FAILED with status $rc (${took}s)" >>"$summary"
    failed=1
  fi
  tail -n 1 "$summary" | tee -a "$log"
  return "$rc"
}

finish() {
  if ls "$dest"/*.json >/dev/null 2>&1; then
    # the tables go into the log, not a file of their own: the device tool brings back at
    # most 8 files
    say ""
    say "=== tables for benchmarks/RESULTS.md (make_results.py)"
    python benchmarks/make_results.py "$dest"/*.json 2>&1 | tee -a "$log" >/dev/null
    if ((PIPESTATUS[0] == 0)); then
      echo "make_results: ok (tables in $log)" >>"$summary"
    else
      echo "make_results: FAILED" >>"$summary"
      failed=1
    fi
  fi
  say ""
  say "=== summary ($mode, ${SECONDS}s; results in $dest)"
  tee -a "$log" <"$summary"
  exit "$failed"
}
