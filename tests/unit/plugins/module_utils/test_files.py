# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Tables for plugins/module_utils/_files.py on real files: reading, the atomic write (mode and owner kept or set,
no temporary file left, no torn read by a concurrent reader process), flock with a timeout against a holder in
another process, map files and env files."""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _files

COLLECTIONS = os.path.abspath(os.path.join(os.path.dirname(_files.__file__), "..", "..", "..", "..", ".."))
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changing a file's owner needs root")


def _other_ids():
    """(uid, gid) of an account that is not us: nobody/nogroup on Debian."""
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


# -- reading ------------------------------------------------------------------------------------------------------


def test_read_text_and_bytes(tmp_path):
    assert _files.read_text(str(tmp_path / "nope")) is None
    assert _files.read_bytes(str(tmp_path / "nope")) is None
    (tmp_path / "f").write_bytes("é\n".encode())
    assert _files.read_text(str(tmp_path / "f")) == "é\n"
    assert _files.read_bytes(str(tmp_path / "f")) == "é\n".encode()
    # Not "absent": a directory where a file should be is an error the caller reports.
    with pytest.raises(IsADirectoryError):
        _files.read_text(str(tmp_path))


# -- atomic write -------------------------------------------------------------------------------------------------

# (id, existing (mode) or None, write kwargs, expected mode)
ATOMIC_MODES = [
    ("new-default-0644", None, {}, 0o644),
    ("new-mode-given", None, {"mode": 0o600}, 0o600),
    ("keeps-0640", 0o640, {}, 0o640),
    ("keeps-0600", 0o600, {}, 0o600),
    ("mode-given-wins", 0o600, {"mode": 0o644}, 0o644),
    ("keeps-setgid-dir-style-bits", 0o2750, {}, 0o2750),
]


@pytest.mark.parametrize(
    ("old_mode", "kwargs", "expected"), [c[1:] for c in ATOMIC_MODES], ids=[c[0] for c in ATOMIC_MODES]
)
@pytest.mark.parametrize("content", ["live green\n", b"live green\n"], ids=["str", "bytes"])
def test_write_atomic_mode(tmp_path, old_mode, kwargs, expected, content):
    path = tmp_path / "live.map"
    old_inode = None
    if old_mode is not None:
        path.write_text("live blue\n")
        os.chmod(path, old_mode)
        old_inode = path.stat().st_ino
    _files.write_atomic(str(path), content, **kwargs)
    assert path.read_bytes() == b"live green\n"
    assert stat.S_IMODE(path.stat().st_mode) == expected
    assert os.listdir(tmp_path) == ["live.map"]  # no temporary file left behind
    if old_inode is not None:
        assert path.stat().st_ino != old_inode  # replaced by a rename, never rewritten in place


@needs_root
@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("kept", {}),
        ("set-by-name", {"owner": "nobody", "group": "nogroup"}),
        ("set-by-id", {"owner": "OTHER_UID", "group": "OTHER_GID"}),
        ("mode-and-owner-kept-together", {"owner": None, "group": None}),
    ],
)
def test_write_atomic_owner(tmp_path, case, kwargs):
    uid, gid = _other_ids()
    kwargs = {k: {"OTHER_UID": uid, "OTHER_GID": gid}.get(v, v) for k, v in kwargs.items()}
    path = tmp_path / "model.env"
    path.write_text("A=1\n")
    if case != "set-by-name" and case != "set-by-id":
        os.chown(path, uid, gid)
    os.chmod(path, 0o640)
    _files.write_atomic(str(path), "A=2\n", **kwargs)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o640)


def test_write_atomic_unknown_owner_changes_nothing(tmp_path):
    path = tmp_path / "f"
    path.write_text("old\n")
    with pytest.raises(KeyError):
        _files.write_atomic(str(path), "new\n", owner="no-such-user-sovereign")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f"]


# (id, what fails, exception)
FAILURES = [
    ("not-text", "content", TypeError),
    ("rename-fails", "replace", OSError),
    ("fsync-fails", "fsync", OSError),
]


@pytest.mark.parametrize(("what", "exc"), [c[1:] for c in FAILURES], ids=[c[0] for c in FAILURES])
def test_write_atomic_failure_keeps_old_file(tmp_path, monkeypatch, what, exc):
    path = tmp_path / "live.map"
    path.write_text("live blue\n")
    content = object() if what == "content" else "live green\n"

    def boom(*args, **kwargs):
        raise OSError(5, "injected I/O error")

    if what == "replace":
        monkeypatch.setattr(_files.os, "replace", boom)
    elif what == "fsync":
        monkeypatch.setattr(_files.os, "fsync", boom)
    with pytest.raises(exc):
        _files.write_atomic(str(path), content)
    assert path.read_text() == "live blue\n"
    assert os.listdir(tmp_path) == ["live.map"]


def test_write_atomic_fsyncs_the_directory(tmp_path, monkeypatch):
    synced = []
    real = _files.fsync_dir
    monkeypatch.setattr(_files, "fsync_dir", lambda path: (synced.append(path), real(path)))
    _files.write_atomic(str(tmp_path / "f"), "x")
    assert synced == [str(tmp_path)]


_READER = textwrap.dedent(
    """
    import sys, time
    path, a, b = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
    size = int(sys.argv[4])
    seen, torn = 0, 0
    deadline = time.monotonic() + float(sys.argv[5])
    while time.monotonic() < deadline:
        with open(path, "rb") as handle:
            data = handle.read()
        seen += 1
        if data not in (a * size, b * size):
            torn += 1
    print(seen, torn)
    """
)


def test_write_atomic_is_never_torn_for_a_concurrent_reader(tmp_path):
    """A reader process reading in a loop while the file is rewritten 1 MiB at a time sees only whole
    versions (a plain open(..., 'w') rewrite fails this: the reader sees empty or half files)."""
    path = tmp_path / "big"
    size = 1 << 20
    _files.write_atomic(str(path), b"A" * size)
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), "A", "B", str(size), "1.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    writes = 0
    while reader.poll() is None:
        _files.write_atomic(str(path), (b"B" if writes % 2 == 0 else b"A") * size)
        writes += 1
    seen, torn = map(int, reader.stdout.read().split())
    assert writes > 5 and seen > 5
    assert torn == 0


# -- flock --------------------------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from ansible_collections.sovereign.mlops.plugins.module_utils._files import FileLock
    with FileLock(sys.argv[1], timeout=5):
        print("locked", flush=True)
        sys.stdin.read()
    """
)


@pytest.fixture
def holder(tmp_path):
    """A process holding the flock on tmp_path/lock until its stdin closes (or it is killed)."""
    path = tmp_path / "sub" / "lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), COLLECTIONS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc, path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("timeout", [0.0, 0.3])
def test_flock_times_out_while_another_process_holds_it(holder, timeout):
    _proc, path = holder
    start = time.monotonic()
    with pytest.raises(_files.LockTimeout) as info, _files.FileLock(str(path), timeout=timeout):
        pass
    assert time.monotonic() - start >= timeout
    assert info.value.path == str(path)
    assert str(timeout) in str(info.value)


@pytest.mark.parametrize("end", ["release", "kill"])
def test_flock_is_free_once_the_holder_releases_or_dies(holder, end):
    proc, path = holder
    if end == "release":
        proc.stdin.close()
    else:
        proc.kill()  # the kernel drops a dead holder's flock: a killed run never leaves it held
    proc.wait()
    with _files.FileLock(str(path), timeout=2) as lock:
        assert lock.fd is not None
    assert path.exists()  # never removed (another process may be waiting on this inode)


def test_flock_waits_for_a_release_within_the_timeout(tmp_path):
    path = str(tmp_path / "lock")
    first = _files.FileLock(path, timeout=1).acquire()
    threading.Timer(0.3, first.release).start()
    start = time.monotonic()
    with _files.FileLock(path, timeout=5):
        waited = time.monotonic() - start
    assert 0.2 < waited < 4


def test_lock_fd_without_timeout_blocks_until_released(tmp_path):
    path = str(tmp_path / "ledger")
    first = _files.FileLock(path, timeout=1).acquire()
    threading.Timer(0.3, first.release).start()
    fd = os.open(path, os.O_RDWR)
    try:
        start = time.monotonic()
        _files.lock_fd(fd)
        assert time.monotonic() - start > 0.2
    finally:
        os.close(fd)


def test_flock_creates_the_file_with_its_mode(tmp_path):
    path = tmp_path / "a" / "b" / "lock"
    with _files.FileLock(str(path), timeout=0, mode=0o600):
        pass
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# -- map files ----------------------------------------------------------------------------------------------------

RENDER = [
    ("replace", "live blue\n", "live", "green", "live green\n"),
    ("keep-comments-and-others", "# c\nother x\nlive blue\n", "live", "green", "# c\nother x\nlive green\n"),
    ("append-when-absent", "other x\n", "live", "green", "other x\nlive green\n"),
    ("new-file", None, "live", "blue", "live blue\n"),
    ("empty-file", "", "live", "blue", "live blue\n"),
    ("drop-duplicates", "live blue\nlive green\n", "live", "blue", "live blue\n"),
    ("no-trailing-newline", "live blue", "live", "blue", "live blue\n"),
    ("tabs", "live\tblue\n", "live", "green", "live green\n"),
    ("prefix-key-untouched", "lively x\n", "live", "blue", "lively x\nlive blue\n"),
]


@pytest.mark.parametrize(("text", "key", "value", "expected"), [c[1:] for c in RENDER], ids=[c[0] for c in RENDER])
def test_render_map(text, key, value, expected):
    assert _files.render_map(text, key, value) == expected
    assert _files.map_value(expected, key) == value


# HAProxy's loader (pattern.c): '#' starts a comment only at the start of a line; the value is the rest of the
# line. So a trailing '# x' is part of the value, as HAProxy itself would route on it.
VALUES = [
    ("simple", "live green\n", "green"),
    ("comment-line", "# live blue\nlive green\n", "green"),
    ("indented-comment", "   # live blue\nlive green\n", "green"),
    ("last-wins", "live blue\nlive green\n", "green"),
    ("value-is-rest-of-line", "live green # note\n", "green # note"),
    ("surrounding-blanks", "  live \t green  \r\n", "green"),
    ("key-without-value", "live\n", ""),
    ("absent", "other x\n", None),
    ("none", None, None),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
def test_map_value(text, expected):
    assert _files.map_value(text, "live") == expected


def test_parse_map_order():
    assert _files.parse_map("# x\nb 2\n\na 1\nb 3\n") == [("b", "2"), ("a", "1"), ("b", "3")]


# -- env files ----------------------------------------------------------------------------------------------------

ENV = [
    ("plain", "A=1\nB=two words\n", {"A": "1", "B": "two words"}),
    ("comments-blanks", "# c\n; c\n\n  \nA=1\n", {"A": "1"}),
    ("single-quotes", "A='q $x \\ \"'\n", {"A": 'q $x \\ "'}),
    ("double-quotes", 'A="d"\n', {"A": "d"}),
    ("double-quote-escapes", 'A="p\\"a\\$H\\`x\\` \\\\ #pw"\n', {"A": 'p"a$H`x` \\ #pw'}),
    ("double-quote-other-backslash-kept", 'A="a\\nb"\n', {"A": "a\\nb"}),
    ("equals-in-value", "A=x=y\n", {"A": "x=y"}),
    ("not-a-pair", "not a pair\nA=1\n", {"A": "1"}),
    ("empty-value", "A=\nB=''\n", {"A": "", "B": ""}),
    ("blanks-around", "  A = 1  \n", {"A": "1"}),
    ("hash-inside-value", "A=a#b\n", {"A": "a#b"}),
    ("last-wins", "A=1\nA=2\n", {"A": "2"}),
    ("no-final-newline", "A=1", {"A": "1"}),
    ("continuation", "A=one \\\ntwo\nB=3\n", {"A": "one two", "B": "3"}),
    ("quoted-multiline", 'A="one\ntwo"\nB=3\n', {"A": "one\ntwo", "B": "3"}),
    ("concatenated", "A='a'\"b\"c\n", {"A": "abc"}),
    ("unquoted-backslash", "A=a\\ b\\\\c\n", {"A": "a b\\c"}),
    ("export-prefix", "export A=1\n", {"A": "1"}),
    ("comment-continuation", "# a \\\nB=2\nC=3\n", {"C": "3"}),
    (
        "model-env",
        "# managed\nSOVEREIGN_RUNTIME_MODEL_URI=models:/fraud@champion\n",
        {"SOVEREIGN_RUNTIME_MODEL_URI": "models:/fraud@champion"},
    ),
    ("empty", "", {}),
    ("none", None, {}),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in ENV], ids=[c[0] for c in ENV])
def test_parse_env(text, expected):
    assert _files.parse_env(text) == expected


HOSTILE = ["", "plain", "p\"a$HOME`x`'s \\ #pw", "trailing\\", " spaced ", "=;#'\"", "é ü"]


@pytest.mark.parametrize("value", HOSTILE)
def test_quote_env_round_trips(value):
    assert _files.parse_env(f"K={_files.quote_env(value)}\n") == {"K": value}


@pytest.mark.parametrize("value", HOSTILE)
def test_parse_env_reads_what_the_role_writes(value):
    """roles/inference_runtime/tasks/install.yml quotes the MLflow credentials with
    regex_replace('([\\\\"$`])', '\\\\\\1') inside double quotes: the parser gets each value back verbatim."""
    written = '"' + re.sub(r'([\\"$`])', r"\\\1", value) + '"'
    assert _files.parse_env(f"# managed\nMLFLOW_TRACKING_PASSWORD={written}\n") == {"MLFLOW_TRACKING_PASSWORD": value}


def test_quote_env_refuses_a_newline():
    with pytest.raises(ValueError, match="newline"):
        _files.quote_env("a\nb")


def test_read_env(tmp_path):
    assert _files.read_env(str(tmp_path / "nope")) is None
    (tmp_path / "x.env").write_text("A=1\n")
    assert _files.read_env(str(tmp_path / "x.env")) == {"A": "1"}
