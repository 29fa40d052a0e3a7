#!/usr/bin/env bash
# Runs a command and prints its wall time, so CI logs show where the time goes.
set -uo pipefail
label=$1; shift
start=$(date +%s)
"$@"; rc=$?
echo "==> ${label}: $(( $(date +%s) - start )) s (exit ${rc})"
exit $rc
