"""sovereign-restic's pure parts on the controller: lock ages, row-count parsing, tree comparison, the
reachability probe against real sockets, the mount-namespace and busy-clone handling (zfs(8) replaced by a
recording double: ZFS itself cannot run here). restic, zfs-fuse and PostgreSQL themselves run in molecule/backup."""

from __future__ import annotations

import datetime
import importlib.util
import socket
import subprocess
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "roles" / "restic_backup" / "files" / "sovereign_restic.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("sovereign_restic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_age_reads_restic_timestamps(tool):
    now = datetime.datetime.now(datetime.UTC)
    stamp = (now - datetime.timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")
    assert 85 < tool.lock_age(stamp) < 120
    offset = (now - datetime.timedelta(hours=2)).astimezone(datetime.timezone(datetime.timedelta(hours=1)))
    assert 7100 < tool.lock_age(offset.strftime("%Y-%m-%dT%H:%M:%S.5+01:00")) < 7300
    assert tool.lock_age("") == 0.0
    assert tool.lock_age("garbage") == 0.0


def test_parse_counts(tool):
    assert tool.parse_counts("public.a|3\npublic.b|0\n\n") == {"public.a": 3, "public.b": 0}


def test_compare_trees_names_the_differing_file(tool, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / "d").mkdir(parents=True)
        (root / "d" / "same.bin").write_bytes(b"x" * 1000)
        (root / "link").symlink_to("d/same.bin")
    (src / "d" / "model.bin").write_bytes(b"abcdef")
    (dst / "d" / "model.bin").write_bytes(b"abcdeX")
    (src / "only-in-source").write_text("1")
    files, nbytes, diffs = tool.compare_trees(str(src), str(dst), "tank/x")
    assert files == 2 and nbytes == 1006
    assert "tank/x/d/model.bin: content differs (sha256) from the ZFS snapshot" in diffs
    assert "tank/x/only-in-source: missing from the restore" in diffs
    assert len(diffs) == 2


def _repo(tool, port):
    cfg = {"password_file": "/nonexistent", "cache_dir": "/tmp", "connect_timeout": 2}
    return tool.Repo(cfg, {"name": "offsite", "url": "sftp:x:/repo", "probe_host": "127.0.0.1", "probe_port": port})


def test_probe_names_host_and_port_when_refused(tool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expected = rf"cannot reach the repository offsite at 127.0.0.1:{port}: connection refused"
    with pytest.raises(tool.Failure, match=expected):
        _repo(tool, port).probe()


def test_probe_passes_when_something_listens(tool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _repo(tool, s.getsockname()[1]).probe()


MOUNTINFO = (
    "86 50 0:40 / / rw,relatime - overlay overlay rw\n"
    "276 86 0:63 / /var/lib/sovereign/restic/mnt/tank_data rw,relatime - fuse.zfs "
    "tank/sovereign-restic-backup-tank_data rw,user_id=0\n"
)


def test_mounted_here_reads_this_namespaces_mountinfo(tool, tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    path = "/var/lib/sovereign/restic/mnt/tank_data"
    assert tool.mounted_here(path, "tank/sovereign-restic-backup-tank_data", str(info))
    assert not tool.mounted_here(path, "tank/other", str(info)), "another dataset at the path is not the clone"
    assert not tool.mounted_here("/var/lib/sovereign/restic/mnt", "tank/sovereign-restic-backup-tank_data", str(info))


def test_holders_names_a_process_whose_cwd_is_under_the_path(tool, tmp_path):
    (tmp_path / "sub").mkdir()
    proc = subprocess.Popen(["sleep", "30"], cwd=tmp_path / "sub")  # pylint: disable=consider-using-with
    try:
        found = tool.holders(str(tmp_path))
    finally:
        proc.kill()
        proc.wait()
    assert f"pid {proc.pid} (sleep): cwd" in found


class FakeZfs:
    """zfs(8) as a recording double: `destroy` answers busy BUSY times, then succeeds."""

    def __init__(self, busy, exists=True):
        self.busy, self.exists, self.calls = busy, exists, []

    def __call__(self, *args, check=True):  # pylint: disable=unused-argument
        self.calls.append(args)
        rc, err = 0, ""
        if args[0] == "list" and not self.exists:
            rc, err = 1, "dataset does not exist"
        elif args[0] == "destroy":
            if self.busy > 0:
                self.busy -= 1
                rc, err = 1, f"cannot destroy '{args[-1]}': dataset is busy"
            else:
                self.exists = False
        return types.SimpleNamespace(returncode=rc, stdout="", stderr=err)


@pytest.fixture()
def fake(tool, monkeypatch, tmp_path):
    def install(busy, exists=True, mounted=True):
        zfs = FakeZfs(busy, exists)
        monkeypatch.setattr(tool, "zfs", zfs)
        monkeypatch.setattr(tool, "mounted_here", lambda path, name, *_: mounted)
        monkeypatch.setattr(tool.time, "sleep", lambda s: None)
        monkeypatch.setattr(tool, "METRICS", tool.Metrics())
        tool.METRICS.path = str(tmp_path / "metrics.prom")
        return zfs

    return install


def _cfg(tmp_path, timeout):
    return {"work_dir": str(tmp_path), "datasets": ["tank/data"], "clone_destroy_timeout": timeout}


def test_a_clone_busy_for_a_moment_is_unmounted_then_destroyed(tool, fake, tmp_path):
    zfs = fake(busy=3)
    assert tool.drop_clone(_cfg(tmp_path, 60), "tank/data") == ""
    assert zfs.calls[1] == ("unmount", "tank/sovereign-restic-backup-tank_data"), "unmounted before destroying"
    assert [c[0] for c in zfs.calls].count("destroy") == 4


def test_a_clone_still_busy_is_left_named_and_counted_not_a_failed_run(tool, fake, tmp_path, capsys):
    fake(busy=10**6)
    tool.record_clones(_cfg(tmp_path, 0), ["tank/data"], "backup")
    err = capsys.readouterr().err
    assert "the clone tank/sovereign-restic-backup-tank_data could not be destroyed" in err and "dataset is busy" in err
    assert "the next run removes it" in err
    metrics = (tmp_path / "metrics.prom").read_text()
    assert 'sovereign_restic_clone_left{dataset="tank/data",purpose="backup"} 1' in metrics


def test_the_next_run_refuses_a_leftover_it_cannot_destroy(tool, fake, tmp_path):
    fake(busy=10**6)
    with pytest.raises(tool.Failure, match=r"an earlier run left behind cannot be destroyed .*dataset is busy"):
        tool.mount_snapshot(_cfg(tmp_path, 0), "tank/data", "restic-1")


def test_a_clone_this_namespace_cannot_see_fails_instead_of_backing_up_nothing(tool, fake, tmp_path):
    zfs = fake(busy=0, exists=False, mounted=False)
    with pytest.raises(tool.Failure, match=r"is not mounted at .* in this process's mount namespace"):
        tool.mount_snapshot(_cfg(tmp_path, 0), "tank/data", "restic-1")
    assert ("mount", "tank/sovereign-restic-backup-tank_data") in zfs.calls


def test_the_drill_names_a_dump_missing_from_the_restore(tool, tmp_path):
    """A restore that stopped at a damaged pack may leave a database's dump out: a difference, not a traceback."""
    (tmp_path / "postgresql").mkdir()
    (tmp_path / "postgresql" / "mlflow.rowcounts.json").write_text('{"public.t": 3}')
    tables, diffs = tool.drill_database({}, "mlflow", str(tmp_path))
    assert tables == 0
    assert diffs == ["database mlflow: its dump mlflow.dump is missing from the restore"]
