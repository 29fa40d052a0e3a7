#!/usr/bin/env bash
# Checks that podman can start a container; only if it cannot, writes the fallback configuration
# this kind of VM needs and says why. Then checks that containers on a user network find each other
# by name (netavark + aardvark-dns, ADR 0005), switching podman's network backend only when that is
# safe. Exits non-zero, naming the cause and the fix, if either still fails.
set -euo pipefail

PROBE_IMAGE=localhost/sovereign-probe:1
CONF=/etc/containers/containers.conf

build_probe_image() {
  podman image exists "$PROBE_IMAGE" && return 0
  local dir
  dir=$(mktemp -d)
  mkdir -p "$dir/bin"
  cp /bin/busybox "$dir/bin/busybox"
  tar -C "$dir" -c bin | podman import --quiet - "$PROBE_IMAGE" >/dev/null
  rm -rf "$dir"
}

probe() {
  podman run --rm --network none "$PROBE_IMAGE" /bin/busybox true >"$1" 2>&1
}

build_probe_image
log=$(mktemp)
trap 'rm -f "$log"' EXIT
check_dns() { bash "$(dirname "$0")/podman-dns-check.sh"; }
if probe "$log"; then
  echo "podman: runs containers"
  check_dns
  exit 0
fi

echo "podman could not start a container:" >&2
sed 's/^/  /' "$log" >&2
if grep -q 'sovereign.mlops fallback' "$CONF" 2>/dev/null; then
  echo "the fallback configuration in $CONF is already in place; fix podman by hand (see the error above)" >&2
  exit 1
fi
# Seen on VMs that deny CAP_SYS_RESOURCE even to root with hybrid cgroups: crun and the default
# ulimits/systemd cgroup manager fail; runc with cgroupfs and no default ulimits works.
echo "writing the fallback configuration to $CONF: runtime=runc, cgroup_manager=cgroupfs, default_ulimits=[]" >&2
if [ -f "$CONF" ]; then cp -a "$CONF" "$CONF.sovereign-backup"; fi
cat >"$CONF" <<'CONF'
# Written by sovereign.mlops scripts/podman-check.sh (sovereign.mlops fallback): podman could not
# start a container with the defaults on this machine (no CAP_SYS_RESOURCE, hybrid cgroups).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
if probe "$log"; then
  echo "podman: runs containers with the fallback configuration"
  check_dns
  exit 0
fi
echo "podman still cannot start a container with the fallback configuration:" >&2
sed 's/^/  /' "$log" >&2
echo "fix: check 'podman info' and that runc is installed (apt-get install runc)" >&2
exit 1
