#!/usr/bin/env bash
# ansible-test needs the collection at .../ansible_collections/<ns>/<name>: run it on a copy.
# Ignore files stay empty: a finding is fixed, not ignored (an entry needs an ADR).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cache/sanity/ansible_collections/sovereign/mlops"
mkdir -p "$dest"
rsync -a --delete --exclude .git --exclude .venv --exclude .cache --exclude .ansible --exclude collections \
  --exclude '.*_cache' --exclude .hypothesis --exclude __pycache__ --exclude .lab --exclude inventories/lab --exclude '*.egg-info' \
  --exclude runtime/build "$root/" "$dest/"
cd "$dest"
# git ls-files decides what ansible-test looks at; give the copy its own index.
git init -q . 2>/dev/null || true
git add -A >/dev/null 2>&1
# ansible-test's --venv mode fetches a pip bootstrap script from Ansible's CI file server, which is
# not reachable from every machine; a dedicated venv with the same ansible-core and --local does
# the same isolation with PyPI only. --requirements installs each sanity test's pinned tools there.
sanity_venv="$root/.cache/sanity-venv"
core=$(grep -i '^ansible-core==' "$root/requirements/constraints.txt")
if [ "$(cat "$sanity_venv/.stamp" 2>/dev/null)" != "$core" ]; then
  rm -rf "$sanity_venv"
  python3 -m venv "$sanity_venv"
  "$sanity_venv/bin/pip" install -q "$core" 2> >(grep -v 'is ignored: it is neither' >&2)
  echo "$core" > "$sanity_venv/.stamp"
fi
export PATH="$sanity_venv/bin:$PATH"
pip_version=$(python3 -c 'import re, ansible_test._internal.python_requirements as r, inspect; print(re.search(r"pip=.([0-9.]+).", inspect.getsource(r)).group(1))')
get_pip="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
mkdir -p "$(dirname "$get_pip")"
cmp -s "$root/scripts/ansible-test-get-pip.py" "$get_pip" || cp "$root/scripts/ansible-test-get-pip.py" "$get_pip"
python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# The inference server, the on-call CLI, benchmarks, examples and repo scripts are not collection content: they have
# their own Python package and checks (ruff, pytest).
excludes=()
for path in runtime/ benchmarks/ examples/ ops/ scripts/ tests/unit/runtime/ tests/unit/examples/ tests/unit/ops/ tests/unit/benchmarks/; do
  [ -n "$(git ls-files "$path" | head -n 1)" ] && excludes+=(--exclude "$path")
done
ansible-test sanity --color no --python "$python_version" --local --requirements "${excludes[@]}" "$@"
