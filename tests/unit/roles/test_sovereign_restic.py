"""sovereign-restic's pure parts on the controller: lock ages, row-count parsing, tree comparison, and the
reachability probe against real sockets. restic, ZFS and PostgreSQL themselves run in molecule/backup."""

from __future__ import annotations

import datetime
import importlib.util
import socket
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
