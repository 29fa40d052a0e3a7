#!/usr/bin/env bash
# Builds the collection tarball and fails if anything that must stay out of it went in.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.cache/build"
rm -rf "$out"; mkdir -p "$out"
ansible-galaxy collection build --force --output-path "$out" "$root" >/dev/null
tarball=$(ls "$out"/sovereign-mlops-*.tar.gz)
listing=$(tar -tzf "$tarball")
# The lab's playbooks and what only they use (galaxy.yml build_ignore) are the checkout's, not the collection's.
lab_only='playbooks/(lab|lab_churn|lab_down)\.yml|playbooks/vars/lab\.yml|playbooks/templates/lab_hosts\.yml\.j2|playbooks/files/lab_alert_receiver\.py'
bad=$(grep -E "^(molecule|tests|\.venv|\.cache|\.ansible|\.hypothesis|\.lab|collections|inventories/lab|benchmarks|examples|scripts|requirements)(/|\$)|^($lab_only)\$|__pycache__|\.pyc\$" <<<"$listing" || true)
if [ -n "$bad" ]; then
  echo "collection tarball contains what must stay out of it:" >&2
  head -n 20 <<<"$bad" >&2
  exit 1
fi
for must in galaxy.yml MANIFEST.json meta/runtime.yml roles/common/tasks/main.yml roles/_common/tasks/wheelhouse.yml \
            playbooks/site.yml playbooks/deploy.yml playbooks/rollback.yml; do
  grep -qx "$must" <<<"$listing" || [ "$must" = galaxy.yml ] || { echo "tarball lacks $must" >&2; exit 1; }
done
echo "built $(basename "$tarball"): $(wc -l <<<"$listing") entries, $(du -h "$tarball" | cut -f1)"
