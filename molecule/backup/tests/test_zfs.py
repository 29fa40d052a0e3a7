"""zfs_datasets on a real systemd container (testinfra, podman backend).

TEST ADAPTATION: the datasets live on zfs-fuse with a file-backed pool, because the OpenZFS kernel module cannot be
loaded in a container; production hosts use OpenZFS (zfsutils-linux) on a pool made from disks. What side_effect.yml
did (a refused mountpoint, a check-mode run, a record size changed in place, a stale drop-in removed) is checked here
too. The data units' drop-ins (ADR 1102) are checked on the units this scenario installs: PostgreSQL 15 (the cluster
postgresql@15-main.service, an instance of postgresql@.service, and postgresql.service) and MLflow (mlflow.service).
It installs no Prometheus: prometheus.service's drop-in is checked as a file only.
"""

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import host_contract

ROOT = "tank/sovereign"
# key -> (mountpoint, record size in bytes); prometheus' 32K was set by side_effect.yml (default 128K).
DATASETS = {
    "postgresql": ("/var/lib/postgresql", "8192"),
    "mlflow_artifacts": ("/var/lib/sovereign/mlflow/artifacts", "131072"),
    "dvc_cache": ("/var/lib/sovereign/dvc/cache", "131072"),
    "prometheus": ("/var/lib/prometheus/metrics2", "32768"),
}


# TEST ADAPTATION: zfs-fuse.service mounts the datasets here; zfs-mount.service does on OpenZFS.
MOUNT_SERVICE = "zfs-fuse.service"
DROPIN = "sovereign-zfs-datasets.conf"
# unit -> the mountpoints its drop-in asserts (the role's default `units`).
DATA_UNITS = {
    "postgresql@.service": ["/var/lib/postgresql"],
    "postgresql.service": ["/var/lib/postgresql"],
    "mlflow.service": ["/var/lib/sovereign/mlflow/artifacts"],
    "prometheus.service": ["/var/lib/prometheus/metrics2"],
}
PG_DATASET = f"{ROOT}/postgresql"
PG_MOUNTPOINT = "/var/lib/postgresql"


def zfs_get(host, dataset, prop):
    return host.check_output("zfs get -H -p -o value %s %s", prop, dataset)


def test_zfs_fuse_runs_in_the_foreground(host):
    """The test adaptation's drop-in: zfs-fuse --no-daemon as Type=simple (the stock unit fails here)."""
    assert host.service("zfs-fuse").is_running
    assert host.service("zfs-fuse").is_enabled
    dropin = host.file("/etc/systemd/system/zfs-fuse.service.d/sovereign-no-daemon.conf")
    assert "ExecStart=/usr/sbin/zfs-fuse --no-daemon" in dropin.content_string
    assert host.check_output("systemctl show -p Type --value zfs-fuse") == "simple"


def test_file_backed_pool(host):
    assert host.file("/var/lib/sovereign-zfs/tank.img").is_file
    assert host.check_output("zpool list -H -o name,health tank") == "tank\tONLINE"


def test_root_dataset_is_not_mounted(host):
    assert zfs_get(host, ROOT, "canmount") == "off"
    assert zfs_get(host, ROOT, "mountpoint") == "none"


@pytest.mark.parametrize("key", sorted(DATASETS))
def test_dataset_properties_and_mount(host, key):
    mountpoint, recordsize = DATASETS[key]
    name = f"{ROOT}/{key}"
    assert zfs_get(host, name, "mountpoint") == mountpoint
    assert zfs_get(host, name, "mounted") == "yes"
    # zfs-fuse has no lz4: the role's default under zfs-fuse is lzjb (lz4 on OpenZFS).
    assert zfs_get(host, name, "compression") == "lzjb"
    assert zfs_get(host, name, "atime") == "off"
    assert zfs_get(host, name, "recordsize") == recordsize
    assert host.check_output("findmnt -n -o SOURCE --target %s", mountpoint) == name


def test_host_contract_publishes_the_datasets(host):
    section = host_contract.read_contract(host)["zfs_datasets"]
    assert section["implementation"] == "zfs-fuse"
    assert section["pool"] == "tank"
    assert section["root"] == ROOT
    units = {
        key: sorted(u for u, mps in DATA_UNITS.items() if mountpoint in mps)
        for key, (mountpoint, _recordsize) in DATASETS.items()
    }
    datasets = section["datasets"]
    assert {key: dict(ds, units=sorted(ds["units"])) for key, ds in datasets.items()} == {
        key: {"name": f"{ROOT}/{key}", "mountpoint": mountpoint, "units": units[key]}
        for key, (mountpoint, _recordsize) in DATASETS.items()
    }
    assert datasets["dvc_cache"]["units"] == []


def test_postgresql_data_and_wal_are_on_their_dataset(host):
    data_dir = host.check_output("su postgres -c \"psql -tAc 'SHOW data_directory'\"")
    assert data_dir.startswith("/var/lib/postgresql/")
    wal = host.file(f"{data_dir}/pg_wal")
    assert wal.is_directory and not wal.is_symlink
    for path in (data_dir, f"{data_dir}/pg_wal"):
        assert host.check_output("findmnt -n -o SOURCE --target %s", path) == f"{ROOT}/postgresql"
    assert host.check_output("su postgres -c \"psql -tAc 'SELECT count(*) FROM items' backuptest\"") == "1000"


def test_occupied_mountpoint_was_refused_and_its_data_kept(host):
    assert host.file("/srv/occupied/keep.txt").content_string == "data that must survive\n"
    assert host.run("zfs list -H %s/occupied", ROOT).rc != 0
    assert host.run("findmnt --mountpoint /srv/occupied").rc != 0


def test_recordsize_changed_in_place_keeps_the_data(host):
    marker = host.file("/var/lib/prometheus/metrics2/marker")
    assert marker.content_string == "kept across the recordsize change\n"


def pg_instance(host):
    """Debian's cluster unit, postgresql@<version>-<cluster>.service (postgresql@15-main on Debian 12)."""
    version, cluster = host.check_output("pg_lsclusters -h").split()[:2]
    return f"postgresql@{version}-{cluster}.service"


def unit_asserts(host, unit):
    """The unit's asserts as systemd loaded them (D-Bus property Asserts, a(sbbsi)): [(type, parameter)]."""
    path = host.check_output(
        "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager LoadUnit s %s",
        unit,
    ).split('"')[1]
    raw = host.check_output(
        "busctl get-property org.freedesktop.systemd1 %s org.freedesktop.systemd1.Unit Asserts", path
    )
    return re.findall(r'"(Assert\w+)" (?:true|false) (?:true|false) "([^"]*)"', raw)


def show(host, unit, *props):
    out = host.check_output("systemctl show %s " + " ".join(["-p %s"] * len(props)), unit, *props)
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.mark.parametrize("unit", sorted(DATA_UNITS))
def test_data_unit_dropin(host, unit):
    """Every data unit has the drop-in: after and wanting the mount service, asserting each of its mountpoints."""
    dropin = host.file(f"/etc/systemd/system/{unit}.d/{DROPIN}")
    assert dropin.is_file
    assert (dropin.user, dropin.group, dropin.mode) == ("root", "root", 0o644)
    lines = [line for line in dropin.content_string.splitlines() if line and not line.startswith("#")]
    expected = ["[Unit]", f"Wants={MOUNT_SERVICE}", f"After={MOUNT_SERVICE}"]
    for mountpoint in DATA_UNITS[unit]:
        expected += [f"RequiresMountsFor={mountpoint}", f"AssertPathIsMountPoint={mountpoint}"]
    assert lines == expected


def test_no_other_data_unit_dropins(host):
    """Exactly the listed units have one (the DVC cache lists none); side_effect.yml's stale one was removed."""
    found = host.check_output("find /etc/systemd/system -mindepth 2 -maxdepth 2 -name %s", DROPIN).split()
    assert sorted(found) == sorted(f"/etc/systemd/system/{unit}.d/{DROPIN}" for unit in DATA_UNITS)
    assert not host.file(f"/etc/systemd/system/sovereign-stale-test.service.d/{DROPIN}").exists


@pytest.mark.parametrize("unit", ["pg_instance", "postgresql.service", "mlflow.service"])
def test_systemd_loaded_the_dropin(host, unit):
    """The installed data units, as systemd loaded them: ordering, wants, mounts and the assert from the drop-in."""
    template = "postgresql@.service" if unit == "pg_instance" else unit
    unit = pg_instance(host) if unit == "pg_instance" else unit
    props = show(host, unit, "LoadState", "After", "Wants", "RequiresMountsFor", "DropInPaths")
    assert props["LoadState"] == "loaded"
    assert f"/etc/systemd/system/{template}.d/{DROPIN}" in props["DropInPaths"].split()
    assert MOUNT_SERVICE in props["After"].split()
    assert MOUNT_SERVICE in props["Wants"].split()
    for mountpoint in DATA_UNITS[template]:
        assert mountpoint in props["RequiresMountsFor"].split()
        assert ("AssertPathIsMountPoint", mountpoint) in unit_asserts(host, unit)


def test_uninstalled_data_unit_is_not_found(host):
    """prometheus.service is not installed here: its drop-in waits for it (checked as a file above)."""
    assert show(host, "prometheus.service", "LoadState")["LoadState"] == "not-found"


def units_holding_mount(host, mountpoint):
    """TEST ADAPTATION (zfs-fuse, ADR 1130): the services that have the mount in a mount namespace of their own.
    In a podman container the root mount is private, so a hardened unit's namespace holds a copy of every mount
    there when it started; zfs-fuse's daemon mounts in the host's namespace only, and refuses to mount a dataset
    again ("mountpoint or dataset is busy") while such a copy keeps it alive. Those units are stopped with
    PostgreSQL and started again after."""
    script = (
        'host=$(readlink /proc/1/ns/mnt); for p in /proc/[0-9]*; do [ "$(readlink $p/ns/mnt)" = "$host" ] && continue;'
        " awk -v m=%s '$5 == m {f = 1} END {exit !f}' $p/mountinfo 2>/dev/null || continue;"
        " grep -o '[^/]*[.]service' $p/cgroup | tail -n 1; done | sort -u"
    )
    return host.check_output(script, mountpoint).split()


def mount_dataset(host, dataset):
    # zfs-fuse releases an unmounted dataset asynchronously (ADR 1130): a mount right after may be refused once.
    host.run_expect([0], "for i in $(seq 30); do zfs mount %s && exit 0; sleep 1; done; exit 1", dataset)


def test_postgresql_refuses_to_start_on_an_unmounted_dataset(host):
    """The real guard: PostgreSQL's dataset unmounted, starting PostgreSQL is refused by the assert and nothing is
    written under the mountpoint; mounted again, it starts on its data. The system is left as it was found."""
    instance = pg_instance(host)
    query = "su postgres -c \"psql -tAc 'SELECT count(*) FROM items' backuptest\""
    rows = host.check_output(query)
    was_active = {u: host.service(u).is_running for u in ("mlflow.service", instance)}
    assert was_active[instance]
    holders = []
    try:
        # MLflow first: it keeps connections to PostgreSQL. Stopping postgresql.service stops its clusters (PartOf).
        stop = ["mlflow.service"] * was_active["mlflow.service"] + ["postgresql.service", instance]
        host.run_expect([0], "systemctl stop " + " ".join(["%s"] * len(stop)), *stop)
        holders = [u for u in units_holding_mount(host, PG_MOUNTPOINT) if u != instance]
        if holders:
            host.run_expect([0], "systemctl stop " + " ".join(["%s"] * len(holders)), *holders)
        assert units_holding_mount(host, PG_MOUNTPOINT) == []
        # zfs-fuse may call the mount busy for a moment after the server exited.
        host.run_expect([0], "for i in $(seq 20); do zfs unmount %s && exit 0; sleep 0.5; done; exit 1", PG_DATASET)
        assert zfs_get(host, PG_DATASET, "mounted") == "no"
        assert host.run("mountpoint -q %s", PG_MOUNTPOINT).rc != 0
        # The directory under the mountpoint: empty (the role mounts only over an empty one), or gone.
        listing = "find %s -mindepth 1 2>/dev/null || true"
        assert host.check_output(listing, PG_MOUNTPOINT) == ""

        for unit in (instance, "postgresql.service"):
            start = host.run("systemctl start %s", unit)
            assert start.rc != 0, f"{unit} started on an unmounted dataset"
            assert f"Assertion failed on job for {unit}" in start.stderr
            assert show(host, unit, "AssertResult")["AssertResult"] == "no"
        assert not host.service(instance).is_running
        assert host.check_output(listing, PG_MOUNTPOINT) == "", "something was written under the mountpoint"
        assert host.run("mountpoint -q %s", PG_MOUNTPOINT).rc != 0
    finally:
        if zfs_get(host, PG_DATASET, "mounted") != "yes":
            mount_dataset(host, PG_DATASET)
        host.run_expect([0], "systemctl start postgresql.service %s", instance)
        for unit in ["mlflow.service"] * was_active["mlflow.service"] + holders:
            host.run_expect([0], "systemctl start %s", unit)

    assert show(host, instance, "AssertResult")["AssertResult"] == "yes"
    assert host.service(instance).is_running
    assert host.check_output("findmnt -n -o SOURCE --target %s", f"{PG_MOUNTPOINT}/") == PG_DATASET
    assert host.check_output(query) == rows
