#!/usr/bin/env bash
# ansible-test needs the collection at .../ansible_collections/<ns>/<name>: run it on a copy.
# Ignore files stay empty: a finding is fixed, not ignored (an entry needs an ADR).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cache/sanity/ansible_collections/sovereign/mlops"
mkdir -p "$dest"
rsync -a --delete --exclude .git --exclude .venv --exclude .cache --exclude .ansible --exclude collections \
  --exclude '.*_cache' --exclude __pycache__ --exclude .lab --exclude inventories/lab --exclude '*.egg-info' \
  --exclude runtime/build "$root/" "$dest/"
cd "$dest"
# git ls-files decides what ansible-test looks at; give the copy its own index.
git init -q . 2>/dev/null || true
git add -A >/dev/null 2>&1
python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
ansible-test sanity --color no --python "$python_version" --venv --requirements \
  --exclude runtime/ --exclude benchmarks/ --exclude examples/ --exclude scripts/ --exclude tests/unit/runtime/ "$@"
