# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""sovereign.mlops.dvc_sync against a real DVC repository with local directory remotes (dvc_fixtures/dvc_repo.py).

Not covered here: an SSH (or cloud) remote on another host; molecule/dvc_sync runs one (a storage host serving the
remote over SSH, a refused key, data missing on it). Here only SSH failures that need no server: a refused port, a
host name that does not resolve, a missing key file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

pytest.importorskip("dvc", reason="dvc is not installed (pip install dvc==3.67.1)")

# DVC 3.67 itself trips pygtrie's deprecation of _NoneStep.value; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

from ansible_collections.sovereign.mlops.plugins.module_utils import _versioned_dest as utils  # noqa: E402
from ansible_collections.sovereign.mlops.plugins.modules import dvc_sync  # noqa: E402
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.dvc_fixtures.dvc_repo import (  # noqa: E402
    V1,
    V2,
    build_repo,
    isolated_dvc_env,
    md5,
    md5s,
    run_module,
    snapshot,
    tree,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("dvc-world"))
    with isolated_dvc_env(base):
        fx = build_repo(base)
    yield fx
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def env(world):
    """DVC isolated for the test; afterwards, DVC must have left no temporary clone behind."""
    with isolated_dvc_env(world.root) as tmp:
        before = set(os.listdir(tmp))
        yield world
        leaked = sorted(set(os.listdir(tmp)) - before)
    assert not leaked, f"temporary files left behind: {leaked}"


def sync(world, dest, check=False, diff=False, **args):
    params = dict(repo=world.repo, path="data", dest=str(dest))
    params.update(args)
    return run_module(dvc_sync, params, check_mode=check, diff=diff)


def beside(dest):
    """Names our module keeps beside dest (version directories, manifest, lock), sorted."""
    parent, name = os.path.split(str(dest))
    if not os.path.isdir(parent):
        return []
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def extra_file(rel, data=b"mine\n"):
    def prep(dest, world):
        path = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fobj:
            fobj.write(data)

    return prep


def make_plain_dir(dest, world):
    os.makedirs(dest)
    with open(os.path.join(dest, "a.txt"), "wb") as fobj:
        fobj.write(V1["data/a.txt"])
    with open(os.path.join(dest, "old.txt"), "wb") as fobj:
        fobj.write(b"left over\n")


def T1(**kw):
    return dict(content=tree(V1), **kw)


def T2(**kw):
    return dict(content=tree(V2), **kw)


ALL1 = sorted(tree(V1))
V1_BYTES = sum(len(v) for k, v in V1.items() if k.startswith("data/"))

# Each scenario is a list of steps run in order on a fresh dest. A step: args (module parameters over
# repo/path=data/dest), check/diff, prep(dest, world) run first, and what to expect: changed, added/updated/removed,
# the md5 tree a reader of dest sees (content), bytes, fails (regex of msg: then dest must be exactly as before,
# same real path, same inodes), same (nothing moved: same real path and inodes as before the step).
SCENARIOS = [
    pytest.param(
        [
            T1(args=dict(rev="v1"), changed=True, added=ALL1, updated=[], removed=[], bytes=V1_BYTES, hashed=0),
            T1(args=dict(rev="v1"), changed=False, added=[], updated=[], removed=[], same=True, bytes=0),
            T2(
                args=dict(rev="v2"),
                changed=True,
                added=["d.txt"],
                updated=["a.txt"],
                removed=["b.txt"],
                bytes=len(V2["data/a.txt"]) + len(V2["data/d.txt"]),
            ),
            T2(args=dict(rev="v2"), changed=False, same=True),
            T1(args=dict(rev="v1"), changed=True, added=["b.txt"], updated=["a.txt"], removed=["d.txt"]),
            T1(args=dict(rev="v1"), changed=False, same=True),
        ],
        id="first-sync-rerun-v2-back-to-v1",
    ),
    pytest.param(
        [
            dict(args=dict(rev="v1"), check=True, changed=True, added=ALL1, bytes=V1_BYTES, content=None, nothing=True),
            T1(args=dict(rev="v1")),
            T1(
                args=dict(rev="v2"),
                check=True,
                changed=True,
                added=["d.txt"],
                updated=["a.txt"],
                removed=["b.txt"],
                bytes=len(V2["data/a.txt"]) + len(V2["data/d.txt"]),
                same=True,
            ),
            T1(args=dict(rev="v1"), check=True, changed=False, same=True),
        ],
        id="check-mode-reports-and-touches-nothing",
    ),
    pytest.param(
        [
            T1(args=dict(rev="v1")),
            T2(
                args=dict(rev="v2"),
                diff=True,
                changed=True,
                diff_before=[
                    r"^# data version: \S+ \S+\.dir$",
                    r"^a\.txt [0-9a-f]{32}$",
                    r"^b\.txt [0-9a-f]{32}$",
                    r"^# 2 unchanged file\(s\) not listed$",
                ],
                diff_after=[r"^a\.txt " + md5(V2["data/a.txt"]) + "$", r"^d\.txt " + md5(V2["data/d.txt"]) + "$"],
            ),
        ],
        id="diff",
    ),
    pytest.param(
        [
            T1(args=dict(rev="v1")),
            dict(
                prep=extra_file("mine/notes.txt"),
                args=dict(rev="v2", delete=False),
                changed=True,
                added=["d.txt"],
                updated=["a.txt"],
                removed=[],
                content=dict(tree(V2), **{"b.txt": md5(V1["data/b.txt"]), "mine/notes.txt": md5(b"mine\n")}),
            ),
            dict(args=dict(rev="v2", delete=False), changed=False, same=True),
            T2(args=dict(rev="v2"), changed=True, added=[], updated=[], removed=["b.txt", "mine/notes.txt"]),
        ],
        id="delete-false-keeps-extra-files",
    ),
    pytest.param(
        [
            T1(
                prep=make_plain_dir,
                args=dict(rev="v1"),
                changed=True,
                added=sorted(set(ALL1) - {"a.txt"}),
                updated=[],
                removed=["old.txt"],
            ),
            T2(args=dict(rev="v2"), changed=True),
        ],
        id="existing-plain-directory-is-exchanged",
    ),
    pytest.param(
        [
            T1(args=dict(rev="v1")),
            T1(
                prep=extra_file("a.txt", b"corrupted by hand\n"),
                args=dict(rev="v1"),
                changed=True,
                added=[],
                updated=["a.txt"],
                removed=[],
            ),
        ],
        id="local-modification-is-repaired",
    ),
    pytest.param(
        [
            dict(
                args=dict(rev="v1", path="model.bin"),
                changed=True,
                added=[""],
                content={"": md5(V1["model.bin"])},
                bytes=len(V1["model.bin"]),
            ),
            dict(args=dict(rev="v1", path="model.bin"), changed=False, same=True),
            dict(
                args=dict(rev="v2", path="model.bin"),
                check=True,
                changed=True,
                updated=[""],
                same=True,
                bytes=len(V2["model.bin"]),
            ),
            dict(args=dict(rev="v2", path="model.bin"), changed=True, updated=[""], content={"": md5(V2["model.bin"])}),
        ],
        id="single-tracked-file",
    ),
    pytest.param(
        [
            dict(
                args=dict(rev="v1", path="data/sub"),
                changed=True,
                added=["c.txt"],
                content={"c.txt": md5(V1["data/sub/c.txt"])},
            ),
        ],
        id="directory-inside-a-tracked-directory",
    ),
    pytest.param(
        [
            T2(args=dict(rev="v2", remote="offsite"), changed=True),
            dict(args=dict(rev="v1", remote="empty"), fails=r"remote 'empty' .* has no data for 'data/"),
            T1(args=dict(rev="v1", remote="backup", remote_config=dict(url="{offsite}")), changed=True),
            dict(args=dict(rev="v2", remote_config=dict(url="{empty}")), fails=r"has no data for|listing of directory"),
        ],
        id="remote-override",
    ),
    pytest.param(
        [
            T1(args=dict(rev="v1")),
            dict(args=dict(rev="no-such-tag"), fails=r"unknown git revision 'no-such-tag'"),
            dict(args=dict(rev="v2", path="docs/README.md"), fails=r"'docs/README.md' is not tracked by DVC"),
            dict(args=dict(rev="v2", path="data.dvc"), fails=r"'data.dvc' is not tracked by DVC"),
            dict(args=dict(rev="v2", path="nothing/here"), fails=r"'nothing/here' does not exist"),
            dict(args=dict(rev="v2", remote="nowhere"), fails=r"DVC remote 'nowhere' is not defined"),
            dict(args=dict(rev="v2", remote="empty"), fails=r"has no data for|listing of directory"),
            dict(args=dict(rev="v2", remote="empty"), check=True, fails=r"has no data for|listing of directory"),
            dict(args=dict(rev="v2", mode="u+rw"), fails=r"mode must be an octal string"),
            dict(args=dict(rev="v2", owner="no-such-user-here"), fails=r"owner 'no-such-user-here' does not exist"),
            T1(args=dict(rev="v1"), changed=False, same=True),
        ],
        id="errors-leave-dest-unchanged",
    ),
    pytest.param(
        [
            dict(dest="{file}/sub/ds", args=dict(rev="v1"), fails=r"is not writable: .* is not a directory"),
            dict(dest="{file}/sub/ds", args=dict(rev="v1"), check=True, fails=r"is not writable"),
        ],
        id="unwritable-dest",
    ),
    pytest.param(
        [
            T1(args=dict(repo="file://{repo}", rev="v1"), changed=True),
            T2(
                args=dict(repo="file://{repo}", rev="v2"),
                changed=True,
                added=["d.txt"],
                updated=["a.txt"],
                removed=["b.txt"],
            ),
            T2(args=dict(repo="file://{repo}"), changed=False, same=True),  # default branch = v2
        ],
        id="git-url-repo",
    ),
]


def _fill(value, world, tmp_path):
    names = dict(repo=world.repo, file=str(tmp_path / "a-file"), **world.remotes)
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, world, tmp_path) for k, v in value.items()}
    return value


@pytest.mark.parametrize("steps", SCENARIOS)
def test_scenario(env, tmp_path, steps):
    world = env
    (tmp_path / "a-file").write_text("a regular file, not a directory\n")
    for number, step in enumerate(steps, 1):
        dest = _fill(step.get("dest", str(tmp_path / "srv" / "ds")), world, tmp_path)
        where = f"step {number}: {step}"
        if step.get("prep"):
            step["prep"](dest, world)
        before, before_beside = snapshot(dest), beside(dest)
        failed, result = sync(
            world,
            dest,
            check=step.get("check", False),
            diff=step.get("diff", False),
            **_fill(step.get("args", {}), world, tmp_path),
        )
        if "fails" in step:
            assert failed, where
            assert re.search(step["fails"], result["msg"]), (where, result["msg"])
            assert "Traceback" not in result["msg"]
            assert snapshot(dest) == before, where
            assert beside(dest) == before_beside, where
            continue
        assert not failed, (where, result.get("msg"), result.get("exception"))
        for key in ("changed", "added", "updated", "removed"):
            if key in step:
                assert result[key] == step[key], (where, key, result)
        if "bytes" in step:
            assert result["bytes_transferred"] == step["bytes"], (where, result)
        if "hashed" in step:
            assert result["files_hashed"] == step["hashed"], (where, result)
        if step.get("nothing"):
            assert not os.path.lexists(os.path.dirname(dest)), "check mode created the parent of dest"
        if "content" in step:
            assert md5s(dest) == step["content"], where
        if step.get("same"):
            assert snapshot(dest) == before, f"{where}: something moved"
            assert beside(dest) == before_beside, where
        if step.get("check"):
            assert snapshot(dest) == before and beside(dest) == before_beside, f"{where}: check mode changed dest"
        rev = step.get("args", {}).get("rev", "v2")
        if rev in world.shas:
            assert result["data_version"]["rev"] == world.shas[rev], where
            if step.get("args", {}).get("path", "data") == "data":
                assert result["data_version"]["md5"] == world.dir_md5[rev], where
        if not step.get("check") and os.path.isdir(dest):
            assert os.path.islink(dest) and result["dest"] == os.path.realpath(dest), where
        for pattern in step.get("diff_before", []):
            assert re.search(pattern, result["diff"]["before"], re.M), (pattern, result["diff"])
        for pattern in step.get("diff_after", []):
            assert re.search(pattern, result["diff"]["after"], re.M), (pattern, result["diff"])


def test_versions_beside_dest_are_pruned(env, tmp_path):
    """keep_versions previous versions stay beside dest (hardlinks for unchanged files); older ones go."""
    dest = str(tmp_path / "ds")
    for rev in ("v1", "v2", "v1", "v2"):
        failed, result = sync(env, dest, rev=rev)
        assert not failed, result
    names = beside(dest)
    versions = [n for n in names if re.match(r"^\.ds\.[0-9a-f]{12}-[0-9a-f]{8}$", n)]
    assert len(versions) == 2 and os.path.basename(os.path.realpath(dest)) in versions
    assert sorted(set(names) - set(versions)) == [".ds.dvc-sync.json", ".ds.dvc-sync.lock"]
    previous = next(v for v in versions if v != os.path.basename(os.path.realpath(dest)))
    assert md5s(str(tmp_path / previous)) == tree(V1)
    # unchanged files are shared with the previous version, not copied
    assert os.stat(os.path.join(dest, "sub/c.txt")).st_ino == os.stat(tmp_path / previous / "sub/c.txt").st_ino

    failed, result = sync(env, dest, rev="v1", keep_versions=0)
    assert not failed and result["changed"]
    assert [n for n in beside(dest) if re.match(r"^\.ds\.[0-9a-f]{12}-[0-9a-f]{8}$", n)] == [
        os.path.basename(os.path.realpath(dest))
    ]


def test_leftovers_of_an_interrupted_run_are_removed_and_a_held_lock_is_respected(env, tmp_path):
    dest = str(tmp_path / "ds")
    assert not sync(env, dest, rev="v1")[0]
    os.makedirs(tmp_path / ".ds.tmp-deadbeef" / "half")  # a staging directory a killed run left behind
    os.symlink(".ds.whatever", tmp_path / ".ds.lnk-0badc0de")
    before = snapshot(dest)
    with open(tmp_path / ".ds.dvc-sync.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed, result = sync(env, dest, rev="v2", lock_timeout=0.3)
    assert failed and "another dvc_sync of" in result["msg"] and snapshot(dest) == before
    failed, result = sync(env, dest, rev="v2")
    assert not failed and result["changed"] and md5s(dest) == tree(V2)
    assert not os.path.lexists(tmp_path / ".ds.tmp-deadbeef") and not os.path.lexists(tmp_path / ".ds.lnk-0badc0de")


def test_manifest_cache_skips_rehashing_but_never_trusts_mtime_alone(env, tmp_path):
    dest = str(tmp_path / "ds")
    assert not sync(env, dest, rev="v1")[0]
    # The first re-run may re-hash files written in the same clock tick as the manifest (git's "racy" rule);
    # it then refreshes the manifest, so the next run reads no file at all.
    assert not sync(env, dest, rev="v1")[0]
    failed, result = sync(env, dest, rev="v1")
    assert not failed and not result["changed"] and result["files_hashed"] == 0

    # Same size, same mtime, different content: the ctime/inode part of the key catches it.
    path = os.path.join(dest, "b.txt")
    st = os.stat(path)
    with open(path, "r+b") as fobj:
        fobj.write(b"B")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    failed, result = sync(env, dest, rev="v1", check=True)
    assert not failed and result["changed"] and result["updated"] == ["b.txt"] and result["files_hashed"] >= 1
    failed, result = sync(env, dest, rev="v1")
    assert not failed and result["updated"] == ["b.txt"]
    assert md5s(dest) == tree(V1)

    # A lost manifest costs only re-hashing.
    os.unlink(tmp_path / ".ds.dvc-sync.json")
    failed, result = sync(env, dest, rev="v1")
    assert not failed and not result["changed"] and result["files_hashed"] == len(tree(V1))


ATTR_CASES = [
    pytest.param(dict(mode="0640", directory_mode="0750"), 0o640, 0o750, id="mode-and-directory-mode"),
    pytest.param(dict(mode=0o600, owner="nobody", group="nogroup"), 0o600, None, id="owner-group-int-mode"),
]


@pytest.mark.parametrize(("args", "file_mode", "dir_mode"), ATTR_CASES)
def test_owner_group_mode(env, tmp_path, args, file_mode, dir_mode):
    dest = str(tmp_path / "ds")
    failed, result = sync(env, dest, rev="v1")
    assert not failed
    old_real = os.path.realpath(dest)
    old_modes = {rel: os.stat(os.path.join(old_real, rel)).st_mode for rel in tree(V1)}

    failed, result = sync(env, dest, rev="v1", **args)
    assert not failed, result
    assert result["changed"] and result["attributes_changed"] == ALL1 and not result["added"] + result["updated"]
    real = os.path.realpath(dest)
    assert real != old_real
    for rel in tree(V1):
        st = os.stat(os.path.join(real, rel))
        assert stat.S_IMODE(st.st_mode) == file_mode
        if "owner" in args:
            import grp
            import pwd

            assert st.st_uid == pwd.getpwnam("nobody").pw_uid and st.st_gid == grp.getgrnam("nogroup").gr_gid
        # the previous (live until the swap) version was not modified
        assert os.stat(os.path.join(old_real, rel)).st_mode == old_modes[rel]
    if dir_mode is not None:
        assert stat.S_IMODE(os.stat(os.path.join(real, "sub")).st_mode) == dir_mode
        assert stat.S_IMODE(os.stat(real).st_mode) == dir_mode
    failed, result = sync(env, dest, rev="v1", **args)
    assert not failed and not result["changed"]


def test_single_file_keeps_exec_bit_and_lands_inside_an_existing_directory(env, tmp_path):
    target_dir = tmp_path / "models"
    target_dir.mkdir()
    failed, result = sync(env, str(target_dir), rev="v2", path="model.bin")
    assert not failed, result
    path = target_dir / "model.bin"
    assert result["dest"] == str(path) and md5(path.read_bytes()) == md5(V2["model.bin"])
    assert os.stat(path).st_mode & stat.S_IXUSR  # DVC records isexec for model.bin
    assert sorted(os.listdir(target_dir)) == [".model.bin.dvc-sync.json", ".model.bin.dvc-sync.lock", "model.bin"]


def test_concurrent_reader_never_sees_a_mix_of_versions(env, tmp_path):
    """A reader that resolves dest once, then lists and hashes every file, sees v1 or v2 whole, never a mix.

    keep_versions=0, so each old version is deleted right after the swap: a read that overlaps the deletion of the
    version it resolved is discarded (snapshot() notices the version is gone), every other read must be exact.
    """
    dest = str(tmp_path / "ds")
    assert not sync(env, dest, rev="v1")[0]
    wanted = [tree(V1), tree(V2)]
    seen, bad, vanished = [], [], [0]
    stop = threading.Event()
    ticks = threading.Condition()

    def reader():
        while not stop.is_set():
            try:
                snap = snapshot(dest)
            except FileNotFoundError:
                vanished[0] += 1  # the version it resolved was removed (keep_versions=0) while it read it
                continue
            except Exception as exc:  # anything else is a failure, reported below (the thread must not die)
                snap = (None, {"error": (repr(exc), None)})
            files = {"dest": ("missing", None)} if snap is None else {k: v[0] for k, v in snap[1].items()}
            (seen if files in wanted else bad).append(files)
            with ticks:
                ticks.notify_all()

    def wait_for_reads(count):
        target = len(seen) + len(bad) + count
        with ticks:
            while len(seen) + len(bad) < target and thread.is_alive():
                ticks.wait(1)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for rev in ("v2", "v1", "v2", "v1", "v2"):
            wait_for_reads(3)
            failed, result = sync(env, dest, rev=rev, keep_versions=0)
            assert not failed and result["changed"], result
        wait_for_reads(3)
    finally:
        stop.set()
        thread.join()
    assert not bad, f"a reader saw a mix of versions: {bad[0]}"
    assert tree(V1) in seen and tree(V2) in seen


def test_exchange_swaps_a_directory_and_a_symlink_atomically(tmp_path):
    """renameat2(RENAME_EXCHANGE) works here; the fallback (two renames) is taken where it does not."""
    layout = utils.Layout(str(tmp_path / "ds"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "old").write_text("old")
    version = layout.version_name("0123456789abcdef")
    (tmp_path / version).mkdir()
    (tmp_path / version / "new").write_text("new")
    aside, warning = utils.swap_in(layout, version)
    assert warning is None and os.path.islink(layout.dest) and os.listdir(layout.dest) == ["new"]
    assert os.listdir(aside) == ["old"]

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")

    layout2 = utils.Layout(str(tmp_path / "ds2"))
    (tmp_path / "ds2").mkdir()
    aside, warning = utils.swap_in(layout2, version, exchange_func=unsupported)
    assert "briefly missing" in warning and os.path.islink(layout2.dest) and os.listdir(layout2.dest) == ["new"]


PLAN_CASES = [
    pytest.param({"a": "x", "b/c": "y"}, {"a": "x", "b": None, "b/c": "y"}, True, dict(changed=False), id="identical"),
    pytest.param(
        {"a/b": "x"},
        {"a": "x"},
        False,
        dict(added=["a/b"], removed=["a"], keep=[]),
        id="untracked-file-where-a-tracked-dir-goes",
    ),
    pytest.param(
        {"a": "x"},
        {"a": None, "a/z": "q"},
        False,
        dict(added=[], updated=["a"], removed=["a/z"]),
        id="tracked-file-where-a-dir-is",
    ),
    pytest.param(
        {"a": "x"},
        {"a": "x", "z": "q", "zz": None, "zz/y": "q"},
        False,
        dict(changed=False, keep=["z", "zz", "zz/y"]),
        id="delete-false-keeps-untracked",
    ),
]


@pytest.mark.parametrize(("tracked", "local", "delete", "expect"), PLAN_CASES)
def test_plan_tree(tmp_path, tracked, local, delete, expect):
    st = os.stat(tmp_path)
    fst = os.stat(__file__)
    local_entries = {
        rel: (dict(kind="dir", st=st) if v is None else dict(kind="file", st=fst, md5=v)) for rel, v in local.items()
    }
    plan = utils.plan_tree({k: dict(md5=v, hash="md5") for k, v in tracked.items()}, local_entries, delete, {})
    for key, value in expect.items():
        assert plan[key] == value, (key, plan)


def test_dir_md5_matches_dvc(env):
    assert utils.dir_md5(tree(V1)) == env.dir_md5["v1"]


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SSH_FAILURES = [
    pytest.param(
        lambda tmp: dict(url=f"ssh://dvc@127.0.0.1:{_closed_port()}/srv/dvc"),
        r"^cannot connect to remote 'ssh1' \(ssh://dvc@127\.0\.0\.1:\d+/srv/dvc\): ConnectionRefusedError: .*"
        r"nothing accepts connections on that host and port",
        id="port-refused",
    ),
    pytest.param(
        lambda tmp: dict(url="ssh://dvc@no-such-host.invalid/srv/dvc"),
        r"^cannot connect to remote 'ssh1' .*: gaierror: .*the host name does not resolve",
        id="unknown-host",
    ),
    pytest.param(
        lambda tmp: dict(url="ssh://dvc@127.0.0.1/srv/dvc", keyfile=str(tmp / "no-such-key")),
        r"^remote_config keyfile .*/no-such-key does not exist on the target host",
        id="missing-keyfile",
    ),
]


# (path, check): check mode of a single file whose size DVC records needs no remote, so it does not fail.
@pytest.mark.parametrize(("path", "check"), [("data", False), ("data", True), ("model.bin", False)])
@pytest.mark.parametrize(("remote_config", "fails"), SSH_FAILURES)
def test_unreachable_ssh_remote_is_named_and_changes_nothing(env, tmp_path, path, remote_config, fails, check):
    """An SSH remote that cannot be reached is reported as such, not as data missing on it (no SSH server needed:
    these fail before any login). The real SSH cases (refused key, data missing) run in molecule/dvc_sync."""
    dest = str(tmp_path / "srv" / "ds")
    failed, result = sync(env, dest, rev="v1", path=path)
    assert not failed, result.get("msg")
    before, before_beside = snapshot(dest), beside(dest)
    failed, result = sync(
        env, dest, rev="v2", path=path, check=check, remote="ssh1", remote_config=remote_config(tmp_path)
    )
    assert failed
    assert re.search(fails, result["msg"]), result["msg"]
    assert "has no data" not in result["msg"] and "neither in the DVC cache" not in result["msg"]
    assert snapshot(dest) == before and beside(dest) == before_beside


def test_missing_dvc_is_reported_with_missing_required_lib(env, tmp_path, monkeypatch):
    monkeypatch.setattr(dvc_sync, "DVC_IMPORT_ERROR", "ImportError: No module named dvc")
    failed, result = sync(env, str(tmp_path / "ds"), rev="v1")
    assert failed and "Failed to import the required Python library (dvc)" in result["msg"]
    assert not os.path.lexists(tmp_path / "ds")


ANSIBLE_PLAYBOOK = shutil.which(
    "ansible-playbook", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
)


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK, reason="ansible-playbook is not installed")
def test_through_ansible_playbook(env, tmp_path):
    """Once through ansible-playbook (local connection, this interpreter): arguments, check mode, idempotence."""
    collections = tmp_path / "collections" / "ansible_collections" / "sovereign"
    collections.mkdir(parents=True)
    repo_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
    os.symlink(repo_root, collections / "mlops")
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    dest = tmp_path / "ds"
    task = f'sovereign.mlops.dvc_sync: {{repo: "{env.repo}", path: data, dest: "{dest}"'
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        textwrap.dedent(f"""\
        - hosts: localhost
          gather_facts: false
          tasks:
            - name: sync v1
              {task}, rev: v1}}
              register: first
            - name: again
              {task}, rev: v1}}
              register: second
            - name: would v2 change?
              {task}, rev: v2}}
              check_mode: true
              register: would
            - ansible.builtin.assert:
                that:
                  - first is changed
                  - second is not changed
                  - would is changed
                  - would.removed == ['b.txt']
                  - first.data_version.rev == "{env.shas["v1"]}"
        """)
    )
    run_env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(tmp_path / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
    )
    proc = subprocess.run(
        [
            ANSIBLE_PLAYBOOK,
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=str(tmp_path),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert md5s(str(dest)) == tree(V1)
