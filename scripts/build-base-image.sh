#!/usr/bin/env bash
# Builds the Debian 12 systemd base image used by molecule and the lab, tagged by a hash of its
# recipe (this file + the extra CA certificates it bakes in), so an unchanged recipe rebuilds nothing.
set -euo pipefail

IMAGE_REPO="${SOVEREIGN_BASE_IMAGE_REPO:-localhost/sovereign-debian12-systemd}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
CACHE_DIR="${SOVEREIGN_CACHE_DIR:-$(pwd)/.cache}/base-image"
PACKAGES=python3,python3-apt,systemd,systemd-sysv,dbus,iproute2,openssh-server,sudo,ca-certificates,procps,gnupg

# The host's extra CAs (e.g. a TLS-intercepting proxy) must be trusted inside the hosts too.
# They are copied in and registered with update-ca-certificates; bind-mounting the host bundle
# instead breaks `apt install ca-certificates` in the container.
extra_cas=()
if [ -d /usr/local/share/ca-certificates ]; then
  while IFS= read -r -d '' f; do extra_cas+=("$f"); done \
    < <(find /usr/local/share/ca-certificates -type f -name '*.crt' -print0 | sort -z)
fi

recipe_hash=$( { cat "$0"; echo "$MIRROR $SECURITY_MIRROR $PACKAGES"; \
  for f in "${extra_cas[@]}"; do cat "$f"; done; } | sha256sum | cut -c1-12)
tag="${IMAGE_REPO}:${recipe_hash}"

if podman image exists "$tag"; then
  podman tag "$tag" "${IMAGE_REPO}:latest"
  echo "base image ${tag} is up to date"
  exit 0
fi

echo "building base image ${tag} (debootstrap, about a minute)"
rootfs="${CACHE_DIR}/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" >"${CACHE_DIR}/debootstrap.log" 2>&1 \
  || { tail -n 30 "${CACHE_DIR}/debootstrap.log" >&2; echo "debootstrap failed: see ${CACHE_DIR}/debootstrap.log" >&2; exit 1; }

cat >"${rootfs}/etc/apt/sources.list" <<SOURCES
deb ${MIRROR} bookworm main
deb ${MIRROR} bookworm-updates main
deb ${SECURITY_MIRROR} bookworm-security main
SOURCES

for f in "${extra_cas[@]}"; do cp "$f" "${rootfs}/usr/local/share/ca-certificates/"; done
chroot "$rootfs" update-ca-certificates >/dev/null

# Each container gets its own identity at first boot.
: >"${rootfs}/etc/machine-id"
rm -f "${rootfs}"/etc/ssh/ssh_host_*
cat >"${rootfs}/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys at first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
chroot "$rootfs" systemctl enable ssh-host-keys.service ssh.service >/dev/null 2>&1
# Units that cannot work (or only make noise) in a container.
for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
            getty.target console-getty.service systemd-remount-fs.service sys-kernel-config.mount \
            systemd-modules-load.service; do
  chroot "$rootfs" systemctl mask "$unit" >/dev/null 2>&1 || true
done

chroot "$rootfs" apt-get clean
rm -rf "${rootfs}"/var/lib/apt/lists/*
# An old mtime makes the apt module's cache_valid_time refresh the (empty) lists.
touch -d @0 "${rootfs}/var/lib/apt/lists"
rm -rf "${rootfs}"/var/log/*.log "${rootfs}"/tmp/* "${rootfs}"/var/cache/debconf/*-old

tar -C "$rootfs" --numeric-owner -c . | podman import --quiet \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change 'STOPSIGNAL SIGRTMIN+3' \
  --change 'ENV container=podman' \
  - "$tag" >/dev/null
podman tag "$tag" "${IMAGE_REPO}:latest"
rm -rf "$rootfs"
echo "built ${tag}"
