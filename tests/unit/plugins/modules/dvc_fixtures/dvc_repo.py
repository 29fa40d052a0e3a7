# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A real DVC repository for the dvc_sync tests (no mocks).

:func:`build_repo` makes a git repository with ``dvc init``, local directory remotes and two commits:

* ``v1``: ``data/`` = a.txt, b.txt, sub/c.txt, run.sh; ``model.bin`` (a single tracked file, executable).
* ``v2``: a.txt changed, b.txt removed, d.txt added, ``model.bin`` changed.

Both versions are pushed to the default remote ``r1`` and to ``offsite``; ``empty`` is a remote with no data.
The repository's own cache is deleted afterwards, so every byte a sync gets comes from a remote.
:func:`isolated_dvc_env` points DVC's site cache, global/system config and temporary directories into the test's
temp dir, so nothing leaks into /var/tmp/dvc, ~/.config/dvc or /tmp.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

V1 = {
    "data/a.txt": b"alpha v1\n",
    "data/b.txt": b"bravo\n",
    "data/sub/c.txt": b"charlie\n",
    "data/run.sh": b"#!/bin/sh\necho hi\n",
    "model.bin": b"\x00model-one" * 500,
}
V2 = {
    "data/a.txt": b"alpha v2, longer\n",
    "data/d.txt": b"delta\n",
    "data/sub/c.txt": b"charlie\n",
    "data/run.sh": b"#!/bin/sh\necho hi\n",
    "model.bin": b"\x00model-two" * 700,
}
DOCS = {"docs/README.md": b"plain git file\n"}


def md5(data):
    return hashlib.md5(data).hexdigest()


def tree(version, prefix="data/"):
    """``{relpath: md5}`` of a version's files under ``prefix``."""
    return {k[len(prefix) :]: md5(v) for k, v in version.items() if k.startswith(prefix)}


@dataclass
class Fixture:
    root: str
    repo: str
    remotes: dict
    shas: dict = field(default_factory=dict)
    dir_md5: dict = field(default_factory=dict)


@contextlib.contextmanager
def isolated_dvc_env(base):
    """DVC's caches and config dirs under ``base`` for the duration (env vars and tempfile.tempdir restored)."""
    tmp = os.path.join(base, "tmp")
    values = {
        "DVC_SITE_CACHE_DIR": os.path.join(base, "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": os.path.join(base, "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": os.path.join(base, "dvc-system"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "TMPDIR": tmp,
    }
    for path in (tmp, values["DVC_GLOBAL_CONFIG_DIR"], values["DVC_SYSTEM_CONFIG_DIR"]):
        os.makedirs(path, exist_ok=True)
    saved = {k: os.environ.get(k) for k in values}
    saved_tempdir = tempfile.tempdir
    os.environ.update(values)
    tempfile.tempdir = tmp  # DVC clones URL repos with tempfile.mkdtemp(); the module must clean them up
    try:
        yield tmp
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _write(root, files):
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fobj:
            fobj.write(data)


def build_repo(base):
    """Create the fixture repository and remotes under ``base`` (inside :func:`isolated_dvc_env`)."""
    from dvc.repo import Repo

    root = os.path.join(base, "repo")
    remotes = {name: os.path.join(base, "remote-" + name) for name in ("r1", "offsite", "empty")}
    for path in remotes.values():
        os.makedirs(path)
    os.makedirs(root)

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "main")
    git("config", "user.name", "dvc_sync tests")
    git("config", "user.email", "dvc-sync-tests@example.invalid")
    git("config", "commit.gpgsign", "false")
    fx = Fixture(root=base, repo=root, remotes=remotes)
    with contextlib.redirect_stdout(io.StringIO()):
        repo = Repo.init(root)
        try:
            with repo.config.edit() as conf:
                for name, url in remotes.items():
                    conf["remote"][name] = {"url": url}
                conf["core"]["remote"] = "r1"
            _write(root, DOCS)
            for tag, files, removed in (("v1", V1, ()), ("v2", V2, ("data/b.txt",))):
                for rel in removed:
                    os.unlink(os.path.join(root, rel))
                _write(root, files)
                os.chmod(os.path.join(root, "model.bin"), 0o755)
                repo.add([os.path.join(root, "data"), os.path.join(root, "model.bin")])
                repo.push()
                repo.push(remote="offsite")
                git("add", "-A")
                git("commit", "-q", "-m", "data " + tag)
                git("tag", tag)
                fx.shas[tag] = git("rev-parse", "HEAD")
                with open(os.path.join(root, "data.dvc")) as fobj:
                    fx.dir_md5[tag] = next(line.split()[-1] for line in fobj if "md5:" in line)
        finally:
            repo.close()
    shutil.rmtree(os.path.join(root, ".dvc", "cache"))
    return fx


def run_module(module, args, check_mode=False, diff=False):
    """Run ``module.main()`` in-process; return (failed, result dict)."""
    import pytest
    from ansible.module_utils.testing import patch_module_args

    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    out = io.StringIO()
    with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        module.main()
    result = json.loads(out.getvalue())
    return bool(result.get("failed")) or exc.value.code != 0, result


def snapshot(path):
    """What a reader of ``path`` sees, resolved once: (real path, {relpath: (md5, inode)}), or None if missing."""
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if os.path.isfile(real):
        with open(real, "rb") as fobj:
            return real, {"": (md5(fobj.read()), os.stat(real).st_ino)}
    files = {}

    def fail(exc):  # os.walk skips unreadable directories silently
        raise exc

    for dirpath, _dirs, names in os.walk(real, onerror=fail):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fobj:
                files[os.path.relpath(full, real)] = (md5(fobj.read()), os.stat(full).st_ino)
    # dvc_sync removes an old version by renaming it away first, then deleting it. A directory opened just before
    # the rename reads as empty once deleted (no error), so a read is complete only if the version is still there.
    if not os.path.isdir(real):
        raise FileNotFoundError(errno.ENOENT, "the version was removed while it was read", real)
    return real, files


def md5s(path):
    snap = snapshot(path)
    return None if snap is None else {k: v[0] for k, v in snap[1].items()}
