#!/usr/bin/env bash
# Checks that containers on a podman user network resolve each other by name, which the lab and the
# multi-host molecule scenarios need (ADR 0005). Podman 4.3 on Debian 12 picks the CNI backend on a
# fresh machine, and nothing installed gives CNI name resolution; netavark + aardvark-dns do. The
# backend is switched only when no container exists (a CNI network's containers would not start
# under netavark); otherwise nothing is changed and the message says what to remove.
set -euo pipefail

PROBE_IMAGE=localhost/sovereign-probe:1 # built by podman-check.sh
DROPIN_DIR=/etc/containers/containers.conf.d
DROPIN=$DROPIN_DIR/50-sovereign-network.conf
NET=sovereign-dns-probe
SERVER=sovereign-dns-probe-a

die() { printf 'podman name resolution: %s\n' "$*" >&2; exit 1; }

for helper in netavark aardvark-dns; do
  [ -x "/usr/lib/podman/$helper" ] ||
    die "/usr/lib/podman/$helper is missing; fix: apt-get install --no-install-recommends netavark aardvark-dns"
done

cleanup() {
  podman rm -f -t 0 "$SERVER" >/dev/null 2>&1 || true
  podman network rm -f "$NET" >/dev/null 2>&1 || true
}
# A probe interrupted earlier may have left its container; it is ours and must not block the switch.
cleanup

backend=$(podman info --format '{{.Host.NetworkBackend}}')
if [ "$backend" != netavark ]; then
  existing=$(podman ps -a --format '{{.Names}}')
  if [ -n "$existing" ]; then
    die "podman uses the $backend network backend, which gives containers no name resolution here
  (user networks show dns_enabled: false). Switching to netavark would leave these containers on
  networks netavark does not know, so nothing was changed:
$(printf '    %s\n' $existing)
  fix: remove them (\`make lab-down\` for the lab, \`podman rm -f NAME\` for others) and run
  \`make bootstrap\` again; or set network_backend = \"netavark\" in $DROPIN yourself."
  fi
  mkdir -p "$DROPIN_DIR"
  cat >"$DROPIN" <<'CONF'
# Written by sovereign.mlops scripts/podman-dns-check.sh (ADR 0005): containers on a user network
# resolve each other by name through aardvark-dns. Podman had chosen CNI, which has no DNS here.
[network]
network_backend = "netavark"
CONF
  backend=$(podman info --format '{{.Host.NetworkBackend}}')
  [ "$backend" = netavark ] || die "wrote $DROPIN but podman still uses $backend; check 'podman info'"
  echo "podman: switched the network backend from cni to netavark ($DROPIN); no container existed," \
    "CNI network files in /etc/cni/net.d were left as they are"
fi

log=$(mktemp)
trap 'cleanup; rm -f "$log"' EXIT
podman network create "$NET" >/dev/null
[ "$(podman network inspect "$NET" --format '{{.DNSEnabled}}')" = true ] ||
  die "a new network has dns_enabled: false under $backend; check that aardvark-dns is installed"
podman run -d --name "$SERVER" --network "$NET" "$PROBE_IMAGE" /bin/busybox sleep 60 >/dev/null 2>"$log" ||
  die "could not start the probe container: $(cat "$log")"
# aardvark-dns learns the name as the container starts; give it a moment before calling it a failure.
for _ in 1 2 3 4 5; do
  if podman run --rm --network "$NET" "$PROBE_IMAGE" /bin/busybox nslookup "$SERVER" >"$log" 2>&1 &&
    grep -q "^Name:[[:space:]]*$SERVER" "$log"; then
    echo "podman: containers on a user network resolve each other by name (netavark + aardvark-dns)"
    exit 0
  fi
  sleep 1
done
echo "a container could not resolve $SERVER on network $NET:" >&2
sed 's/^/  /' "$log" >&2
die "name resolution between containers does not work; check 'podman network inspect $NET' and
  that aardvark-dns runs (ps -C aardvark-dns) and is not blocked by a firewall on the bridge's port 53"
