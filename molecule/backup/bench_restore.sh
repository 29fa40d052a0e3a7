#!/usr/bin/env bash
# Measurement for docs/benchmarks.md (issue #11, "retrieval under a minute"); NOT part of `molecule test`.
# Run from the repository root after `molecule converge -s backup` (then `molecule destroy -s backup`), or on the lab:
#   bash molecule/backup/bench_restore.sh [MiB, default 1024]
#   BENCH_DATA=ops-01 BENCH_REPO=backup-01 bash molecule/backup/bench_restore.sh
# In molecule-backup-data it writes MiB of random artifacts (64 MiB files) into the mlflow_artifacts dataset, takes
# a backup to the SFTP repository on molecule-backup-repo (the job's own argv), changes 1 % of the bytes and takes
# an incremental one, then times (a) `restic restore` of the artifacts into scratch and (b) the restore.yml path
# (`sovereign-restic restore --dataset ... --into` the live mountpoint after the artifacts were deleted), checks
# the restored bytes against their sha256 before the loss, the time to the first byte of one artifact (restic dump), runs the drill, and prints the sizes and the load.
# TEST ADAPTATION: zfs-fuse, so the pool is grown by a second file vdev for the extra GiBs.
set -euo pipefail
MIB=${1:-1024}
# BENCH_DATA / BENCH_REPO: other containers, e.g. the lab's (BENCH_DATA=ops-01 BENCH_REPO=backup-01 after make lab).
D=${BENCH_DATA:-molecule-backup-data} R=${BENCH_REPO:-molecule-backup-repo}
exec_d() { podman exec -i "$D" bash -euo pipefail -c "$1"; }
t() { local s; s=$(date +%s.%N); "$@" >/dev/null; awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $s }"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "load before: $(load)"
exec_d "truncate -s $(( MIB * 4 / 1024 + 2 ))G /var/lib/sovereign-zfs/bench.img && zpool add -f tank /var/lib/sovereign-zfs/bench.img 2>/dev/null || true"
exec_d "mkdir -p /var/lib/sovereign/mlflow/artifacts/bench && cd /var/lib/sovereign/mlflow/artifacts/bench &&
  for i in \$(seq 1 $(( MIB / 64 ))); do head -c 64M /dev/urandom > part-\$i.bin; done && sync &&
  sha256sum part-*.bin > /root/bench.sha256 && du -sb . | cut -f1 > /root/bench.bytes"
ARGV=$(exec_d "python3 -c 'import json; print(\" \".join(json.load(open(\"/etc/ansible/facts.d/sovereign.fact\"))[\"restic_backup\"][\"jobs\"][\"restic_backup\"][\"argv\"]))'")
TOOL=/usr/local/libexec/sovereign/sovereign-restic
MNT=/var/lib/sovereign/restic/mnt/tank_sovereign_mlflow_artifacts

echo "source bytes: $(exec_d 'cat /root/bench.bytes')"
echo "first backup with the new data: $(t exec_d "$ARGV") s (load $(load))"
echo "restore-side repository size after the first backup: $(podman exec "$R" du -sb "/srv/restic/restic-$D/repo" | cut -f1) bytes"
echo "source processed: $(exec_d "grep -h 'backup_bytes_processed' /var/lib/prometheus/node-exporter/sovereign_restic_backup.prom | awk '{print \$2}'") bytes"
# 1 % of the bytes changed: 64 MiB-file offsets overwritten with new random data, spread over the files.
exec_d "cd /var/lib/sovereign/mlflow/artifacts/bench && n=\$(ls part-*.bin | wc -l) && per=\$(( $MIB * 1024 * 1024 / 100 / n )) &&
  for f in part-*.bin; do head -c \$per /dev/urandom | dd of=\$f bs=1M seek=7 conv=notrunc iflag=fullblock status=none; done && sync &&
  sha256sum part-*.bin > /root/bench.sha256"
echo "incremental backup after a 1 % change: $(t exec_d "$ARGV") s (load $(load)); $(exec_d "grep -h 'backup_bytes_added' /var/lib/prometheus/node-exporter/sovereign_restic_backup.prom")"
echo "repository size: $(podman exec "$R" du -sb "/srv/restic/restic-$D/repo" | cut -f1) bytes"
exec_d "sync; echo 3 > /proc/sys/vm/drop_caches"
# Time to first byte: one artifact streamed from the repository (restic dump), read until its first byte, then whole.
echo "first byte of one 64 MiB artifact (restic dump | head -c 1): $(t exec_d "{ $TOOL restic offsite dump latest $MNT/bench/part-1.bin || true; } | head -c 1 | wc -c") s (load $(load))"
echo "all of that artifact (restic dump to a file): $(t exec_d "$TOOL restic offsite dump latest $MNT/bench/part-1.bin > /var/tmp/part-1.bin") s (load $(load))"
exec_d "cd /var/tmp && grep ' part-1.bin\$' /root/bench.sha256 | sha256sum -c --quiet && echo dumped artifact identical && rm -f /var/tmp/part-1.bin"
exec_d "sync; echo 3 > /proc/sys/vm/drop_caches"
echo "restic restore of the artifacts into scratch: $(t exec_d "rm -rf /var/tmp/bench && $TOOL restic offsite restore latest --target /var/tmp/bench --include $MNT/bench") s (load $(load))"
exec_d "cd /var/tmp/bench$MNT/bench && sha256sum -c --quiet /root/bench.sha256 && echo restored bytes identical && rm -rf /var/tmp/bench"
exec_d "rm -rf /var/lib/sovereign/mlflow/artifacts/bench; sync; echo 3 > /proc/sys/vm/drop_caches"
echo "restore.yml path (sovereign-restic restore --dataset --into the live mountpoint, rsync included): $(t exec_d "$TOOL restore --repository offsite --dataset tank/sovereign/mlflow_artifacts --into /var/lib/sovereign/mlflow/artifacts") s (load $(load))"
exec_d "cd /var/lib/sovereign/mlflow/artifacts/bench && sha256sum -c --quiet /root/bench.sha256 && echo restored bytes identical"
echo "restore drill (all datasets and databases): $(t exec_d "$TOOL drill") s (load $(load))"
