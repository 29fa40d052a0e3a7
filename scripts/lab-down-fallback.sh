#!/usr/bin/env bash
# `make lab-down` without a .venv (bootstrap never ran or was removed): the same removal by hand.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
for name in $(podman ps -a --filter label=sovereign.lab --format '{{.Names}}' 2>/dev/null); do
  # A second try: on a loaded machine podman rm can time out waiting for conmon's exit file (see lab_down.yml).
  for _ in 1 2 3; do podman rm -f "$name" >/dev/null && { echo "removed container $name"; break; }; sleep 5; done
done
podman network exists sovereign-lab 2>/dev/null && podman network rm sovereign-lab >/dev/null && echo "removed network sovereign-lab"
rm -rf .lab inventories/lab
echo "lab removed"
