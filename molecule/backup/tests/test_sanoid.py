"""sanoid on a real systemd container with zfs-fuse (testinfra, podman backend).

TEST ADAPTATIONS: zfs-fuse instead of OpenZFS (no kernel module in a container) and, for it only, the `zfs get -t`
shim; dvc_cache has a test policy (one "frequently" snapshot a minute, keep 1) so pruning shows within the run.
The snapshots are taken and pruned by the role's own unit, started here as its timer would.
"""

import pathlib
import re
import shlex
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import systemd_units

test_managed_units_have_no_ignored_settings = systemd_units.test_managed_units_have_no_ignored_settings

ROOT = "tank/sovereign"
DATASETS = ["dvc_cache", "mlflow_artifacts", "postgresql", "prometheus"]
SEEDED = [f"{ROOT}/dvc_cache@autosnap_2000-01-{d}_00:00:00_frequently" for d in ("01", "02", "03")]
MANUAL = f"{ROOT}/dvc_cache@manual-keep"
METRICS = "/var/lib/prometheus/node-exporter/sovereign_sanoid.prom"


def snapshots(host, dataset):
    """name -> creation (Unix time) of the dataset's snapshots."""
    out = host.check_output("zfs get -H -p -d 1 -o name,value creation %s", dataset)
    return {n: int(v) for n, v in (line.split("\t") for line in out.splitlines()) if "@" in n}


def metrics(host):
    samples = {}
    for line in host.file(METRICS).content_string.splitlines():
        m = re.match(r'^(\w+)\{(?:job|dataset)="([^"]+)"\} (\S+)$', line)
        if m:
            samples[(m.group(1), m.group(2))] = float(m.group(3))
    return samples


@pytest.fixture(scope="module")
def sanoid_run(host):
    """One run of the role's unit, once the seeded snapshots are older than the test policy keeps.

    The timer (every 15 min) may have run between the converge and this test and pruned the seeded snapshots
    already: that is the role's own unit too, and test_expired_snapshots_pruned_manual_kept reads its journal.
    """
    seeded = snapshots(host, f"{ROOT}/dvc_cache")
    host.run("zfs destroy %s", MANUAL)
    host.check_output("zfs snapshot %s", MANUAL)
    present = [seeded[s] for s in SEEDED if s in seeded]
    wait = max(present) + 65 - time.time() if present else 0
    if wait > 0:
        time.sleep(wait)
    started = time.time()
    # Twice: a run takes its new snapshot and prunes from the list it read first, so with three expired seeds and
    # keep 1 the first run prunes two and the second the third (the timer's next run would).
    for _run in range(2):
        result = host.run("systemctl start sovereign-sanoid.service")
        assert result.rc == 0, host.check_output("journalctl -u sovereign-sanoid.service -n 40 --no-pager")
    return started


def test_package_timer_is_masked_and_ours_runs_in_utc(host):
    for unit in ("sanoid.timer", "sanoid.service", "sanoid-prune.service"):
        assert host.check_output("systemctl is-enabled %s || true", unit) == "masked"
    assert host.service("sovereign-sanoid.timer").is_enabled
    assert host.service("sovereign-sanoid.timer").is_running
    assert host.check_output("systemctl show -p TimersCalendar --value sovereign-sanoid.timer").find("UTC") > 0
    unit = host.file("/etc/systemd/system/sovereign-sanoid.service").content_string
    assert "sovereign-job --job sanoid" in unit and "--lock" in unit and "Environment=TZ=UTC" in unit


def test_config_has_a_section_per_dataset(host):
    conf = host.file("/etc/sanoid/sanoid.conf").content_string
    for key in DATASETS:
        assert f"[{ROOT}/{key}]" in conf
    section = conf.split(f"[{ROOT}/postgresql]")[1].split("[")[0]
    for line in ("hourly = 24", "daily = 30", "monthly = 12", "autoprune = yes"):
        assert line in section


def test_zfs_get_t_shim_only_for_zfs_fuse(host):
    shim = host.file("/usr/local/lib/sovereign/zfs-fuse-shim/zfs")
    assert shim.is_file and shim.mode == 0o755
    assert "TEST ADAPTATION" in shim.content_string
    out = host.check_output("/usr/local/lib/sovereign/zfs-fuse-shim/zfs get -Hrpt snapshot creation %s", ROOT)
    assert out and all("@" in line.split("\t")[0] for line in out.splitlines())


def test_snapshots_taken_for_every_dataset(host, sanoid_run):
    for key in DATASETS:
        names = snapshots(host, f"{ROOT}/{key}")
        for kind in ("hourly", "daily", "monthly"):
            assert any(n.endswith(f"_{kind}") and n.split("@")[1].startswith("autosnap_") for n in names), (key, kind)


def test_expired_snapshots_pruned_manual_kept(host, sanoid_run):
    names = snapshots(host, f"{ROOT}/dvc_cache")
    assert not set(SEEDED) & set(names), "sanoid did not prune the expired frequently snapshots"
    assert MANUAL in names, "sanoid pruned a snapshot it did not take"
    frequent = [n for n in names if n.endswith("_frequently")]
    # keep 1: the newest, taken by this run or by the timer's within the last period.
    assert len(frequent) == 1 and names[frequent[0]] >= int(sanoid_run) - 900
    journal = host.check_output("journalctl -u sovereign-sanoid.service --no-pager -o cat")
    for snap in SEEDED:
        assert f"pruning {snap}" in journal


def test_metrics_per_dataset(host, sanoid_run):
    samples = metrics(host)
    now = time.time()
    written = host.file(METRICS).mtime.timestamp()
    assert samples[("sovereign_job_success", "sanoid")] == 1
    assert samples[("sovereign_job_max_age_seconds", "sanoid")] == 3600
    for key in DATASETS:
        name = f"{ROOT}/{key}"
        autosnaps = {n: c for n, c in snapshots(host, name).items() if "@autosnap_" in n}
        assert samples[("sovereign_zfs_snapshots", name)] == len(autosnaps)
        assert samples[("sovereign_zfs_snapshot_newest_timestamp_seconds", name)] == max(autosnaps.values())
        assert samples[("sovereign_zfs_snapshot_max_age_seconds", name)] == 7200
        # Fresh by the role's own threshold (an hourly policy: the newest may be the converge's, minutes old),
        # and the age is the one at the time the metrics were written (margin: the run's own duration).
        newest = samples[("sovereign_zfs_snapshot_newest_timestamp_seconds", name)]
        age = samples[("sovereign_zfs_snapshot_newest_age_seconds", name)]
        assert 0 <= now - newest < 7200
        assert 0 <= age < 7200 and abs(written - newest - age) < 300, (written, newest, age)
    f = host.file(METRICS)
    assert f.user == "root" and f.mode & 0o004


def test_postgresql_recovers_from_a_crash_consistent_snapshot(host, sanoid_run):
    """ADR 1101: a snapshot of the running server (no CHECKPOINT) is a crash image; PostgreSQL replays its WAL."""
    snaps = snapshots(host, f"{ROOT}/postgresql")
    newest = max((n for n in snaps if "@autosnap_" in n), key=snaps.get)
    clone, mnt = f"{ROOT}/pgclone", "/srv/pgclone"
    host.run("zfs destroy -r %s", clone)
    live = host.check_output("su postgres -c \"psql -tAc 'SHOW data_directory'\"")
    data = live.replace("/var/lib/postgresql", mnt, 1)
    version = live.split("/")[4]  # /var/lib/postgresql/<version>/main
    host.check_output("zfs clone -o mountpoint=%s %s %s", mnt, newest, clone)
    pg_ctl = f"/usr/lib/postgresql/{version}/bin/pg_ctl -D {data}"
    opts = (
        f"-c config_file=/etc/postgresql/{version}/main/postgresql.conf -c data_directory={data} -p 5499"
        " -c listen_addresses='' -c unix_socket_directories=/tmp -c external_pid_file=/tmp/pgclone.pid"
    )
    try:
        # The live server's pid is in the image (it was running); a restored host would not run it.
        host.check_output("rm -f %s/postmaster.pid", data)
        start = host.run("su postgres -c %s", f"{pg_ctl} -w -t 60 -l /tmp/pgclone.log -o {shlex.quote(opts)} start")
        assert start.rc == 0, host.run("cat /tmp/pgclone.log").stdout
        query = "psql -h /tmp -p 5499 -tAc 'SELECT count(*) FROM items' backuptest"
        assert host.check_output("su postgres -c %s", query) == "1000"
        assert "database system was interrupted" in host.file("/tmp/pgclone.log").content_string
    finally:
        host.run("su postgres -c %s", f"{pg_ctl} -m fast stop")
        host.run("zfs destroy -r %s", clone)
