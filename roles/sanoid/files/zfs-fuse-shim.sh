#!/bin/sh
# TEST ADAPTATION (sovereign.mlops.sanoid, zfs-fuse only; OpenZFS hosts never get this file).
# sanoid 2.1 reads its snapshots with `zfs get -Hrpt snapshot creation`; zfs-fuse's `zfs get` has no -t, so
# sanoid would find no snapshot and never prune. This answers that one call with `zfs get -Hrp` restricted to
# snapshots (names with '@'), in the same tab-separated form; every other call goes to zfs unchanged.
if [ "$1" = get ] && [ "$2" = -Hrpt ] && [ "$3" = snapshot ]; then
    shift 3
    /usr/sbin/zfs get -Hrp "$@" > "${TMPDIR:-/tmp}/sovereign-zfs-shim.$$" || { rc=$?; rm -f "${TMPDIR:-/tmp}/sovereign-zfs-shim.$$"; exit "$rc"; }
    awk -F '\t' 'index($1, "@") > 0' "${TMPDIR:-/tmp}/sovereign-zfs-shim.$$"
    rm -f "${TMPDIR:-/tmp}/sovereign-zfs-shim.$$"
    exit 0
fi
exec /usr/sbin/zfs "$@"
