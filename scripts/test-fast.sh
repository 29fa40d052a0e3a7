#!/usr/bin/env bash
# `make test-fast`: the checks that need no container, in lanes that run side by side. Each argument is one lane: make
# targets run one after another (a failing step does not stop its lane). The Makefile's TEST_FAST_LANES gives one lane
# (two lanes, unit tests beside lint and sanity, pushed load-sensitive unit tests over: docs/benchmarks.md "Test suite").
# Output stays readable: each step writes its own log (.cache/test-fast/STEP.log), printed whole when the step ends,
# never interleaved with another step's, with its wall time and exit status; a summary follows. The exit status is
# the first failing step's (in the order the steps are listed), 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
[ $# -gt 0 ] || { echo "usage: $0 'STEP STEP ...' ['STEP ...' ...] (one quoted list of make targets per lane)" >&2; exit 2; }
# All in one function, parsed whole before it runs: bash reads a script as it goes, and a checkout that changes under a
# running test-fast (a merge, an edit) would otherwise change what it runs, and its exit status (seen 2026-12-02).
main() {
  logs=.cache/test-fast
  rm -rf "$logs"; mkdir -p "$logs"
  exec 9>"$logs/.print.lock"

  run_step() {
    local step=$1 start rc
    start=$(date +%s)
    make --no-print-directory "$step" >"$logs/$step.log" 2>&1 </dev/null; rc=$?
    echo "$rc $(( $(date +%s) - start ))" >"$logs/$step.result"
    {
      flock 9
      echo "----- ${step} -----"
      cat "$logs/$step.log"
      echo "==> ${step}: $(( $(date +%s) - start )) s ($([ $rc -eq 0 ] && echo passed || echo "FAILED, exit $rc"))"
    }
  }

  lane() {
    local step
    for step in $1; do run_step "$step"; done
  }

  steps=()
  pids=()
  for spec in "$@"; do
    # shellcheck disable=SC2206  # a lane is a space-separated list of make targets
    steps+=($spec)
    lane "$spec" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done

  rc=0
  echo "----- test-fast summary -----"
  for step in "${steps[@]}"; do
    if [ -f "$logs/$step.result" ]; then read -r src secs <"$logs/$step.result"; else src=1; secs=-; fi
    printf '  %-16s %5s s  %s\n' "$step" "$secs" "$([ "$src" -eq 0 ] && echo passed || echo "FAILED, exit $src: log above and in $logs/$step.log")"
    [ "$src" -eq 0 ] || [ $rc -ne 0 ] || rc=$src
  done
  exit $rc
}
main "$@"
