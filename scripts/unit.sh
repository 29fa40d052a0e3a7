#!/usr/bin/env bash
# `make unit`: one pytest process per argument (a group of test folders, see UNIT_GROUPS in the Makefile), one after
# another; folders that do not exist are left out, a group with no tests collected is no failure. Exits non-zero
# when any group failed (with the last failing group's status), after running every group.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
rc=0
for group in "$@"; do
  paths=$(for p in $group; do [ -d "$p" ] && echo "$p"; done)
  [ -n "$paths" ] || continue
  echo "==> pytest $(echo $paths)"
  # The slowest tests in every log: where the suite's time goes (docs/benchmarks.md "Test suite").
  # shellcheck disable=SC2086  # one word per folder
  prc=0; pytest -n "${PYTEST_WORKERS:-2}" --durations=15 $paths || prc=$?
  if [ $prc -eq 5 ]; then echo "pytest: no tests collected in $(echo $paths)"; prc=0; fi
  [ $prc -eq 0 ] || rc=$prc
done
exit $rc
