"""zfs_datasets on a real systemd container (testinfra, podman backend).

TEST ADAPTATION: the datasets live on zfs-fuse with a file-backed pool, because the OpenZFS kernel module cannot be
loaded in a container; production hosts use OpenZFS (zfsutils-linux) on a pool made from disks. What side_effect.yml
did (a refused mountpoint, a check-mode run, a record size changed in place) is checked here too.
"""

import pathlib
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
    assert section["datasets"] == {
        key: {"name": f"{ROOT}/{key}", "mountpoint": mountpoint} for key, (mountpoint, _recordsize) in DATASETS.items()
    }


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
