#!/usr/bin/env bash
# Runs each molecule scenario as its own `molecule test -s NAME` process, N at a time (scenarios
# are independent; `molecule test --all` would share one instance set). Logs go to
# .cache/molecule-logs/NAME.log; the tail of each failing scenario's log is printed.
set -uo pipefail
jobs=$1; shift
[ $# -gt 0 ] || { echo "molecule: no scenarios"; exit 0; }
# Longest first (measured runs, slowest first), so the last scenario to start is a short one and the N
# slots finish together; a scenario not listed here is taken as long and starts first.
LONGEST_FIRST=(release backup monitoring zenoh inference_runtime feast traffic_switch
               mlflow nvidia_gpu dvc_sync common)
ordered=()
for s in "$@"; do [[ " ${LONGEST_FIRST[*]} " == *" $s "* ]] || ordered+=("$s"); done
for s in "${LONGEST_FIRST[@]}"; do [[ " $* " == *" $s "* ]] && ordered+=("$s"); done
set -- "${ordered[@]}"
export MOLECULE_GLOB='molecule/*/molecule.yml'
export logs=.cache/molecule-logs
rm -rf "$logs"; mkdir -p "$logs"
run_one() {
  local s=$1 start rc
  start=$(date +%s)
  molecule test -s "$s" >"$logs/$s.log" 2>&1; rc=$?
  echo "molecule ${s}: $([ $rc -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || touch "$logs/$s.failed"
  return $rc
}
export -f run_one
printf '%s\n' "$@" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}
rc=$?
for f in "$logs"/*.failed; do
  [ -e "$f" ] || continue
  s=$(basename "$f" .failed)
  echo "----- molecule ${s}: last 100 lines of $logs/$s.log -----"
  tail -n 100 "$logs/$s.log"
done
exit $rc
