# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The dest side of ``sovereign.mlops.dvc_sync``: versions beside dest, hashing, the manifest cache, planning and
the atomic swap.

Private to the sovereign.mlops collection (leading underscore): no stability promise to anyone else.
Nothing here calls DVC (that is _dvc.py): the module passes what DVC told it (paths, md5s) and a ``fetch`` callable.
Only the hash of DVC 2-era repositories (md5-dos2unix) is taken from dvc_data, when such a repository is synced.

Layout beside ``dest`` (see docs/adr/0301-dvc-sync-atomic-swap.md), for ``dest=/srv/data/ds``::

    /srv/data/ds                      symlink -> .ds.<md5 12 hex>-<8 hex>  (the stable path readers use)
    /srv/data/.ds.<md5 12>-<8 hex>/   one complete, immutable version per sync
    /srv/data/.ds.dvc-sync.json       manifest: which version is live, history, md5/stat cache of its files
    /srv/data/.ds.dvc-sync.lock       flock, so two syncs of one dest never interleave
    /srv/data/.ds.tmp-<8 hex>         staging (a version being built), .ds.lnk-* (new symlink), .ds.trash-*
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.sovereign.mlops.plugins.module_utils._dvc_sync_errors import SyncError
from ansible_collections.sovereign.mlops.plugins.module_utils._files import (
    FileLock,
    LockTimeout,
    fsync_dir,
    write_atomic,
)

MANIFEST_FORMAT = 1
CHUNK = 1024 * 1024

# renameat2(2) flags and the syscall number where glibc has no wrapper (glibc < 2.28).
AT_FDCWD = -100
RENAME_EXCHANGE = 2
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}


# -- hashing -----------------------------------------------------------------------------------------------------


def file_md5(path, hash_name="md5"):
    """DVC's hash of a local file: plain md5 (DVC 3, ``hash: md5``) or DVC 2's md5-dos2unix."""
    if hash_name == "md5-dos2unix":
        from dvc_data.hashfile.hash import fobj_md5  # only DVC 2-era repos need it; dvc is installed then

        with open(path, "rb") as fobj:
            return fobj_md5(fobj, name=hash_name)
    if hash_name != "md5":
        raise SyncError(f"unsupported DVC hash {hash_name!r} (only md5 and md5-dos2unix are)")
    digest = hashlib.md5()  # DVC's content address, not a security hash
    with open(path, "rb") as fobj:
        for chunk in iter(lambda: fobj.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_md5(files):
    """DVC's ``.dir`` hash of a tree given as ``{relpath: md5}`` (same JSON as dvc_data's Tree.as_bytes)."""
    entries = sorted(({"md5": md5, "relpath": rel} for rel, md5 in files.items()), key=lambda e: e["relpath"])
    data = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(data).hexdigest() + ".dir"


# -- the names beside dest ---------------------------------------------------------------------------------------


class Layout:
    """The paths :mod:`dvc_sync` owns beside ``dest``."""

    def __init__(self, dest):
        self.dest = os.path.abspath(dest).rstrip(os.sep) or os.sep
        self.parent, self.name = os.path.split(self.dest)
        if not self.name:
            raise SyncError("dest must not be the root directory")
        self.manifest = self.sibling(f".{self.name}.dvc-sync.json")
        self.lock = self.sibling(f".{self.name}.dvc-sync.lock")
        quoted = re.escape(self.name)
        self._version_re = re.compile(rf"^\.{quoted}\.([0-9a-f]{{12}})-([0-9a-f]{{8}})$")
        self._temp_re = re.compile(rf"^\.{quoted}\.(tmp|lnk|trash)-([0-9a-f]{{8}})$")

    def sibling(self, name):
        return os.path.join(self.parent, name)

    def temp(self, kind):
        return self.sibling(f".{self.name}.{kind}-{secrets.token_hex(4)}")

    def version_name(self, md5):
        return f".{self.name}.{(md5 or '0' * 12)[:12]}-{secrets.token_hex(4)}"

    def is_version(self, name):
        return bool(self._version_re.match(name))

    def siblings(self):
        """(versions, temps): basenames of our version directories and of leftovers of interrupted runs."""
        try:
            names = os.listdir(self.parent)
        except FileNotFoundError:
            return [], []
        return (
            sorted(n for n in names if self._version_re.match(n)),
            sorted(n for n in names if self._temp_re.match(n)),
        )

    def state(self):
        """'missing', 'link' (a symlink to a directory), 'dir', 'file' or 'other' for dest itself."""
        try:
            st = os.lstat(self.dest)
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        if stat.S_ISLNK(st.st_mode):
            return "link" if os.path.isdir(self.dest) else "other"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if stat.S_ISREG(st.st_mode):
            return "file"
        return "other"

    def current_version(self):
        """Basename of our version directory dest points to, or None (not a symlink or not one of ours)."""
        try:
            target = os.readlink(self.dest)
        except OSError:
            return None
        if os.sep in target or not self.is_version(target):
            return None
        return target


def nearest_existing(path):
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_parent(layout):
    """Error text when nothing can be created beside dest (checked without changing anything), else None."""
    base = nearest_existing(layout.parent)
    if not os.path.isdir(base):
        return (
            f"dest {layout.dest} is not writable: {base} is not a directory, so {layout.parent} cannot be "
            "created; choose a dest under a directory"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        return (
            f"dest {layout.dest} is not writable: no write permission on {base} (the module creates files "
            "beside dest); run with become or fix the permissions"
        )
    return None


# -- the manifest (a cache: losing it only costs re-hashing) -----------------------------------------------------


def _stat_key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def load_manifest(layout):
    try:
        with open(layout.manifest, "rb") as fobj:
            data = json.load(fobj)
        written_ns = os.stat(layout.manifest).st_mtime_ns
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {}
    data["_written_ns"] = written_ns
    return data


def save_manifest(layout, data):
    data = dict((k, v) for k, v in data.items() if not k.startswith("_"))
    data["format"] = MANIFEST_FORMAT
    write_atomic(layout.manifest, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class HashCache:
    """md5 of local files, reusing the manifest's md5 when the file's stat says it was not touched since.

    The key is (size, mtime_ns, ctime_ns, inode, device), never a timestamp alone: ctime cannot be set back by
    users (utime sets only atime/mtime), and any write, rename-over or hardlink change moves it. Like git's
    "racy" entries, a file whose mtime or ctime is not older than the manifest itself is hashed again: it may
    have changed within the clock tick the manifest was written in.
    """

    def __init__(self, manifest_files=None, written_ns=0):
        self.cached = manifest_files or {}
        self.written_ns = written_ns or 0
        self.hashed = []  # relpaths that were read and hashed this run (the tests count them)

    def md5(self, rel, path, st, hash_name):
        entry = self.cached.get(rel)
        if (
            entry
            and entry.get("hash", "md5") == hash_name
            and entry.get("stat") == _stat_key(st)
            and st.st_mtime_ns < self.written_ns
            and st.st_ctime_ns < self.written_ns
        ):
            return entry["md5"]
        self.hashed.append(rel)
        return file_md5(path, hash_name)


def manifest_files(root, tracked):
    """Manifest entries for the tracked files as they are now under ``root`` (after every link/chmod/chown)."""
    out = {}
    for rel, item in tracked.items():
        try:
            st = os.lstat(os.path.join(root, rel))
        except OSError:
            continue
        out[rel] = {"md5": item["md5"], "hash": item["hash"], "stat": _stat_key(st)}
    return out


# -- comparing the local tree with the tracked one ---------------------------------------------------------------


def scan_tree(root, tracked, cache):
    """What is under ``root``: ``{relpath: entry}``, entry ``kind`` file/link/dir/other; tracked files get md5."""
    out = {}
    if not root or not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = name if reldir == "." else reldir + "/" + name
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = {"kind": "dir", "st": st}
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = {"kind": "link", "st": st}
                if name in dirnames:
                    dirnames.remove(name)
            elif stat.S_ISREG(st.st_mode):
                entry = {"kind": "file", "st": st, "md5": None}
                if rel in tracked:
                    entry["md5"] = cache.md5(rel, full, st, tracked[rel]["hash"])
                out[rel] = entry
            else:
                out[rel] = {"kind": "other", "st": st}
    return out


def attrs_ok(st, item, attrs):
    """Whether an existing file already has the wanted owner, group and mode (exec bit for DVC's isexec)."""
    if attrs.get("uid") is not None and st.st_uid != attrs["uid"]:
        return False
    if attrs.get("gid") is not None and st.st_gid != attrs["gid"]:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if attrs.get("mode") is not None:
        return mode == file_mode(item, attrs)
    return not item.get("isexec") or bool(mode & stat.S_IXUSR)


def file_mode(item, attrs, current=None):
    """The mode a synced file gets: ``mode`` (+x where DVC says isexec), else its current mode (+x if isexec)."""
    if attrs.get("mode") is not None:
        mode = attrs["mode"]
    else:
        mode = current if current is not None else 0o666 & ~attrs.get("umask", 0o022)
    if item.get("isexec"):
        mode |= (mode & 0o444) >> 2  # x where r, like chmod +x under the usual umask
    return mode


def plan_tree(tracked, local, delete, attrs):
    """Decide every path of the new version.

    Returns a dict: ``added``/``updated``/``removed``/``attributes`` (sorted relpaths for the result),
    ``fetch`` (download), ``link`` (unchanged, reused by hardlink), ``copy`` (same content, other
    attributes: copied so the live version is never modified), ``keep`` (untracked paths kept when
    delete=false) and ``changed``.
    """
    added, updated, fetch, link, copy, attributes = [], [], [], [], [], []
    for rel in sorted(tracked):
        item, have = tracked[rel], local.get(rel)
        if not have or have["kind"] != "file":
            (updated if have else added).append(rel)
            fetch.append(rel)
        elif have["md5"] != item["md5"]:
            updated.append(rel)
            fetch.append(rel)
        elif attrs_ok(have["st"], item, attrs):
            link.append(rel)
        else:
            attributes.append(rel)
            copy.append(rel)

    tracked_dirs = set()
    for rel in tracked:
        parts = rel.split("/")
        tracked_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))

    removed, keep = [], []
    for rel in sorted(local):
        have = local[rel]
        if rel in tracked or (have["kind"] == "dir" and rel in tracked_dirs):
            continue
        if have["kind"] == "dir":
            # an untracked directory: kept (delete=false) unless a tracked file sits where it or its parent is
            if not delete and not _blocked(rel, tracked, tracked_dirs):
                keep.append(rel)
            continue
        if delete or have["kind"] == "other" or _blocked(rel, tracked, tracked_dirs):
            removed.append(rel)
        else:
            keep.append(rel)
    changed = bool(added or updated or removed or attributes)
    return dict(
        added=added,
        updated=updated,
        removed=removed,
        attributes=attributes,
        fetch=fetch,
        link=link,
        copy=copy,
        keep=keep,
        changed=changed,
    )


def _blocked(rel, tracked, tracked_dirs):
    """An untracked path that cannot stay: a tracked file needs its name as a directory, or vice versa."""
    if rel in tracked_dirs and rel not in tracked:
        return True  # an untracked file where the tracked tree has a directory
    parts = rel.split("/")
    return any("/".join(parts[:i]) in tracked for i in range(1, len(parts)))


# -- building a version and swapping it in -----------------------------------------------------------------------


def link_or_copy(src, dst):
    """Hardlink an unchanged file into the new version (no data copied); copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(src, dst)


def set_attrs(path, uid, gid, mode):
    if uid is not None or gid is not None:
        os.lchown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None:
        os.chmod(path, mode)


def build_version(staging, current_root, tracked, plan, attrs, fetch, jobs):
    """Fill ``staging`` with the whole new version. ``fetch(rel, path)`` downloads one tracked file.

    Returns the bytes downloaded. Every downloaded file is checked against DVC's md5 before it is used.
    """

    def ensure_parent(rel):
        parent = os.path.dirname(os.path.join(staging, rel))
        os.makedirs(parent, exist_ok=True)

    for rel in plan["keep"]:
        src, dst = os.path.join(current_root, rel), os.path.join(staging, rel)
        st = os.lstat(src)
        ensure_parent(rel)
        if stat.S_ISDIR(st.st_mode):
            os.makedirs(dst, exist_ok=True)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        else:
            link_or_copy(src, dst)

    for rel in plan["link"]:
        ensure_parent(rel)
        link_or_copy(os.path.join(current_root, rel), os.path.join(staging, rel))

    for rel in plan["copy"]:
        ensure_parent(rel)
        dst = os.path.join(staging, rel)
        shutil.copy2(os.path.join(current_root, rel), dst)
        set_attrs(
            dst, attrs.get("uid"), attrs.get("gid"), file_mode(tracked[rel], attrs, stat.S_IMODE(os.lstat(dst).st_mode))
        )

    def one(rel):
        item = tracked[rel]
        dst = os.path.join(staging, rel)
        ensure_parent(rel)
        fetch(rel, dst)
        got = file_md5(dst, item["hash"])
        if got != item["md5"]:
            raise SyncError(
                f"downloaded {rel} has md5 {got} but DVC records {item['md5']}: the remote holds "
                "corrupt data; re-push it (dvc push) from a good copy"
            )
        set_attrs(dst, attrs.get("uid"), attrs.get("gid"), file_mode(item, attrs, stat.S_IMODE(os.lstat(dst).st_mode)))
        return os.lstat(dst).st_size

    total = 0
    if plan["fetch"]:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(plan["fetch"])))) as pool:
            for size in pool.map(one, plan["fetch"]):
                total += size

    dir_mode, uid, gid = attrs.get("directory_mode"), attrs.get("uid"), attrs.get("gid")
    for dirpath, dirnames, _files in os.walk(staging):
        for name in dirnames:
            set_attrs(os.path.join(dirpath, name), uid, gid, dir_mode)
    set_attrs(staging, uid, gid, dir_mode if dir_mode is not None else 0o755)
    return total


def fsync_tree(root):
    """Flush a finished version to disk before it becomes visible (a crash must not expose empty files)."""
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


_renameat2 = None


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = getattr(libc, "renameat2", None)
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = func
        else:
            number = _RENAMEAT2_SYSCALL.get(os.uname().machine)

            def func(olddirfd, old, newdirfd, new, flags):
                if number is None:
                    ctypes.set_errno(errno.ENOSYS)
                    return -1
                return libc.syscall(number, olddirfd, old, newdirfd, new, ctypes.c_uint(flags))

            _renameat2 = func
    return _renameat2


def exchange(a, b):
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE). Raises OSError (ENOSYS/EINVAL where unsupported)."""
    func = _load_renameat2()
    if func(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)


def swap_in(layout, version_name, exchange_func=None):
    """Point dest at ``version_name`` in one atomic step. Returns (old directory now aside or None, warning).

    dest a symlink or missing: a new symlink is renamed over it (rename(2) is atomic). dest a real directory
    (first sync over an existing tree): renameat2(RENAME_EXCHANGE) swaps it with the new symlink atomically and
    the old tree is moved aside as a version; where the kernel or filesystem lacks RENAME_EXCHANGE the old tree
    is renamed away first, so dest is briefly missing (never half-filled), and a warning says so.
    """
    tmp_link = layout.temp("lnk")
    os.symlink(version_name, tmp_link)
    try:
        state = layout.state()
        if state in ("missing", "link") or (state == "other" and os.path.islink(layout.dest)):
            os.rename(tmp_link, layout.dest)
            return None, None
        if state != "dir":
            raise SyncError(
                f"dest {layout.dest} exists and is not a directory ({state}): remove it or choose another dest"
            )
        aside = layout.sibling(layout.version_name(None))
        try:
            (exchange_func or exchange)(tmp_link, layout.dest)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
                raise
            os.rename(layout.dest, aside)
            os.rename(tmp_link, layout.dest)
            return aside, (
                f"renameat2(RENAME_EXCHANGE) is not available here ({exc.strerror}): the existing "
                f"directory {layout.dest} was "
                "moved aside before the new version took its place, so it was briefly missing; later "
                "syncs swap a symlink and are atomic"
            )
        os.rename(tmp_link, aside)  # tmp_link now names the old directory
        return aside, None
    finally:
        if os.path.islink(tmp_link):
            os.unlink(tmp_link)
        fsync_dir(layout.parent)


def remove_tree(layout, path):
    """Remove an old version: first renamed to a trash name, so a reader still walking it by path gets ENOENT
    instead of a half-deleted listing, then deleted."""
    trash = layout.temp("trash")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def prune(layout, current, history, keep):
    """Remove our version directories except ``current`` and the ``keep`` most recent previous ones.

    Returns the new history (most recent first, current first).
    """
    versions, temps = layout.siblings()
    previous = [v for v in history if v != current and v in versions][:keep]
    for name in versions:
        if name != current and name not in previous:
            remove_tree(layout, layout.sibling(name))
    for name in temps:
        path = layout.sibling(name)
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return [current, *previous]


class DestLock:
    """flock on the lock file beside dest for the duration of a sync (created, parent made if missing)."""

    def __init__(self, layout, timeout):
        self.layout = layout
        self.timeout = timeout
        self._lock = FileLock(layout.lock, timeout=timeout, mode=0o600, poll=0.1, make_dirs=False)

    def __enter__(self):
        try:
            self._lock.acquire()
        except LockTimeout:
            raise SyncError(
                f"another dvc_sync of {self.layout.dest} has held {self.layout.lock} for "
                f"{self.timeout}s; wait for it or raise lock_timeout"
            ) from None
        return self

    def __exit__(self, *args):
        self._lock.release()
        return False
