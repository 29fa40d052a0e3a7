#!/usr/bin/env bash
# `make rules`: every role's alert rules parse (`promtool check rules`, the check the prometheus role runs as
# `validate:`), and every role's rule tests pass (`promtool test rules`: each alert fires, stays silent just
# under its threshold, resolves). Files: roles/*/files/monitoring/alerts.yml and alerts_test.yml beside them
# (ARCHITECTURE §7, ADR 1520). promtool is Debian's `prometheus` package (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null || { echo "promtool-test: promtool not found: run 'make bootstrap' (Debian package prometheus)" >&2; exit 1; }

shopt -s nullglob
rules=(roles/*/files/monitoring/alerts.yml)
tests=(roles/*/files/monitoring/alerts_test.yml)
[ ${#rules[@]} -gt 0 ] || { echo "promtool-test: no roles/*/files/monitoring/alerts.yml" >&2; exit 1; }

rc=0
for file in "${rules[@]}"; do
  [ -f "$(dirname "$file")/alerts_test.yml" ] || { echo "promtool-test: $file has no alerts_test.yml beside it" >&2; rc=1; }
done
# Group names (sovereign.<role>, unique across roles) and annotations: tests/unit/monitoring/test_alert_rules.py.
promtool check rules "${rules[@]}" || rc=1
# rule_files in a test file are relative to that file; run each from its own directory so messages name it.
for file in "${tests[@]}"; do
  (cd "$(dirname "$file")" && promtool test rules "$(basename "$file")" 2>&1) | sed "s|^|$(dirname "$file"): |" || rc=1
done
exit $rc
