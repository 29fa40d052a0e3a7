#!/usr/bin/env bash
# `make bootstrap`: everything both README commands need, idempotent. A second run takes seconds:
# each step checks a stamp (a hash of its inputs) and skips when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip warns about every absent local index a machine's pip.conf may name; keep real errors only.
quiet_pip() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
say() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and runs rootful podman)"
. /etc/os-release
[ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ] || die "needs Debian 12 (found ${PRETTY_NAME:-unknown})"

# 1. Debian packages ---------------------------------------------------------------------------
# netavark + aardvark-dns: name resolution between containers on a user network (ADR 0005);
# iptables: netavark's port forwarding. haproxy: its binary validates and runs test configs.
# prometheus: promtool for `make rules` (alert rules and their tests, ADR 1520); its server runs unit-test fixtures.
APT_PACKAGES=(podman runc netavark aardvark-dns iptables debootstrap busybox-static haproxy rsync git make
              openssh-client python3-venv ca-certificates curl jq prometheus)
# redis-server: the runtime's feature-fetch tests start their own on a free loopback port (never the service)
APT_PACKAGES+=(redis-server)
# The shellcheck package: ansible-test sanity's shellcheck test (it is skipped, with a warning only, where the binary is absent)
# and `make shellcheck` for the repo's own scripts.
APT_PACKAGES+=(shellcheck)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages: present"
fi
# Debian's prometheus package enables its service; PID 1 is not systemd here, so nothing starts. Tests start
# their own prometheus processes on free loopback ports.
shellcheck --version >/dev/null 2>&1 || die "shellcheck (Debian package shellcheck) does not run: 'shellcheck --version' failed"
promtool --version >/dev/null 2>&1 || die "promtool (Debian package prometheus) does not run: 'promtool --version' failed"
# The machine's own haproxy service is left alone: tests start their own haproxy processes on free
# loopback ports, and Debian's stock haproxy.cfg listens on none.

# 2. podman ------------------------------------------------------------------------------------
say "checking that podman runs containers and resolves their names"
bash scripts/podman-check.sh

# 3. Python virtual environment ------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
venv_stamp=$(cat requirements/dev.in requirements/constraints.txt runtime/pyproject.toml ops/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
if [ -f .venv/.stamp ] && [ "$(cat .venv/.stamp)" = "$venv_stamp" ]; then
  say "virtual environment .venv: up to date"
else
  say "creating .venv (pinned by requirements/constraints.txt)"
  rm -rf .venv  # a half-made venv (an interrupted run) is made again, not patched
  "$PYTHON" -m venv .venv
  quiet_pip .venv/bin/pip install -q --upgrade pip
  # uv (pinned, in dev.in too) installs the rest, as the roles fill the hosts' venvs (ADR 0007): it downloads and
  # unpacks in parallel and keeps its cache (~/.cache/uv), so a fresh clone's venv takes ~30 s instead of minutes.
  quiet_pip .venv/bin/pip install -q -c requirements/constraints.txt uv
  # unsafe-best-match: pick each package's pinned version from whichever index has it, as pip does (uv's default
  # takes a package only from the first index that lists it, and PyTorch's index lists numpy, jinja2, ...).
  # --compile-bytecode: pip wrote the .pyc files at install time, uv does not by default; where
  # PYTHONDONTWRITEBYTECODE is set (this CI machine) every process would compile ansible & co. again (2x slower suite).
  uv_install=(.venv/bin/uv pip install --python .venv/bin/python -q --index-strategy unsafe-best-match
              --compile-bytecode -c requirements/constraints.txt)
  # torch pinned: an unpinned torch would pull several GB of CUDA wheels. Its CPU build comes from a local wheel
  # directory where the machine has one, else from PyTorch's CPU index.
  torch_source=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  if compgen -G "${TORCH_FIND_LINKS:-/opt/wheels}/torch-*.whl" >/dev/null; then
    torch_source=(--find-links "${TORCH_FIND_LINKS:-/opt/wheels}")
  fi
  "${uv_install[@]}" "${torch_source[@]}" torch -r requirements/dev.in
  # The repo's own packages: the inference server and the on-call CLI (sovereign-ops).
  for package in runtime ops; do
    if [ -f "$package/pyproject.toml" ]; then
      "${uv_install[@]}" --no-deps -e "$package"
    fi
  done
  # What was installed must import and agree: a missing or conflicting dependency fails here, not in a test.
  .venv/bin/uv pip check --python .venv/bin/python -q || die ".venv: 'uv pip check' found broken requirements (above)"
  .venv/bin/python -c 'import ansible, molecule, torch, sovereign_runtime, sovereign_ops' \
    || die ".venv: a core package does not import (above)"
  echo "$venv_stamp" > .venv/.stamp
fi

# 4. Base image for molecule and the lab -------------------------------------------------------
say "base image"
bash scripts/build-base-image.sh

# 5. Wheelhouse: what hosts install with pip, built on the controller, installed offline --------
say "wheelhouse"
quiet_pip .venv/bin/python scripts/wheelhouse.py

say "bootstrap done"
