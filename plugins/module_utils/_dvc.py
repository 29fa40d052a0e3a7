# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The DVC adapter of ``sovereign.mlops.dvc_sync``: how DVC's Python API is called and what its answers mean.

Private to the sovereign.mlops collection (leading underscore): no stability promise to anyone else.

Everything that imports DVC or knows its objects (``dvc.api.DVCFileSystem``, its ``dvc_info`` entries, the
repository's DataFileSystem, remote object databases, the temporary clones) is here. The module and _versioned_dest
see only :class:`TrackedData`: ``tracked`` (``{relpath: {md5, hash, size, isexec}}``), ``fetch(rel, local_path)``
and ``sizes(rels)``. Problems DVC reports are raised as SyncError with the fix in the message (_dvc_sync_errors).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

from ansible_collections.sovereign.mlops.plugins.module_utils._dvc_sync_errors import (
    SyncError,
    connection_error,
    redact_url,
    unreachable,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._versioned_dest import dir_md5

DVC_IMPORT_ERROR = None
try:
    import dvc.api
    from dvc_data.index import DataIndexDirError
except ImportError:
    DVC_IMPORT_ERROR = traceback.format_exc()


@contextlib.contextmanager
def stdout_to_stderr():
    """DVC may print; the module's stdout must carry only its JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def hash_name_of(dvc_info):
    entry = dvc_info.get("entry")
    return entry.hash_info.name if entry is not None and entry.hash_info else "md5"


class TrackedData:
    """The tracked version: what DVC says ``path`` holds at ``rev``, and how to download one file of it.

    Opening it opens the repository (a URL is cloned by DVC); :meth:`load` lists the files; :meth:`close` removes
    what DVC made for the run. ``warn`` is called with a message for what does not stop the run.
    """

    def __init__(self, repo, path, rev=None, remote=None, remote_config=None, warn=None):
        self.repo = repo
        self.path = path.strip("/")
        self.requested_rev = rev
        self.remote = remote
        self.warn = warn or (lambda msg: None)
        if rev is None and os.path.isdir(repo):
            rev = "HEAD"  # a local checkout's default would be its workspace; a sync is always of a commit
        kwargs = dict(rev=rev)
        if remote:
            kwargs["remote"] = remote
        if remote_config:
            kwargs["remote_config"] = remote_config
        self.fs = dvc.api.DVCFileSystem(repo, **kwargs)
        self.datafs = None
        self.sha = None
        self.kind = None
        self.md5 = None
        self.tracked = {}

    def describe_remote(self):
        try:
            config = self.fs.repo.config
            name = self.remote or config["core"].get("remote")
            if not name:
                return "the repository cache (the repository has no default remote and no remote was given)"
            url = (config["remote"].get(name) or {}).get("url")
            return f"remote '{name}' ({redact_url(url)})"
        except Exception:  # only for a message
            return f"remote '{self.remote or 'default'}'"

    def load(self):
        """List the tracked files with their md5; raises SyncError with a message for the user."""
        fs = self.fs
        self.sha = fs.repo.get_rev()
        # Downloads go straight to the repository's DataFileSystem (as DVCFileSystem.get does for DVC-tracked
        # files), which DVC itself uses from many threads; DVCFileSystem.get_file would first probe git.
        self.datafs = fs.repo.datafs
        at = f"{self.repo} at {self.requested_rev or 'the default revision'}"
        try:
            info = fs.info(self.path)
        except FileNotFoundError:
            raise SyncError(
                f"path '{self.path}' does not exist in {at}; give a path relative to the repository root"
            ) from None
        dvc_info = info.get("dvc_info") or {}
        if not dvc_info.get("isout"):
            hint = ""
            if info.get("type") == "directory":
                outs = [name for name, i in fs.find(self.path, detail=True).items() if i.get("dvc_info")]
                if outs:
                    hint = f" (it is a git directory that holds DVC outputs such as {outs[0]}: sync each one)"
            raise SyncError(
                f"path '{self.path}' is not tracked by DVC in {at}{hint}; give a path that has a .dvc "
                "file or is an output of dvc.yaml, or a path inside one"
            )
        if info["type"] != "directory":
            self.kind = "file"
            self.md5 = dvc_info["md5"]
            self.tracked[""] = dict(
                md5=self.md5, hash=hash_name_of(dvc_info), size=dvc_info.get("size"), isexec=dvc_info.get("isexec")
            )
            return
        self.kind = "directory"
        try:
            found = fs.find(self.path, detail=True)
        except DataIndexDirError as exc:
            self.raise_if_unreachable(exc)
            raise SyncError(
                f"the listing of directory '{self.path}' (DVC object {dvc_info.get('md5')}) is neither "
                f"in the DVC cache nor on {self.describe_remote()}: push it with dvc push, or choose "
                "the remote that has it"
            ) from None
        prefix = self.path + "/"
        for name, finfo in found.items():
            fdvc = finfo.get("dvc_info") or {}
            if fdvc.get("isout"):
                self.tracked[name[len(prefix) :]] = dict(
                    md5=fdvc["md5"], hash=hash_name_of(fdvc), size=fdvc.get("size"), isexec=fdvc.get("isexec")
                )
        self.md5 = dvc_info.get("md5") or dir_md5({rel: item["md5"] for rel, item in self.tracked.items()})

    def rpath(self, rel):
        return f"{self.path}/{rel}" if rel else self.path

    def raise_if_unreachable(self, exc):
        conn = connection_error(exc)
        if conn is not None:
            raise unreachable(self.describe_remote(), conn) from None

    def missing(self, rel):
        return SyncError(
            f"{self.describe_remote()} has no data for '{self.rpath(rel)}' (md5 "
            f"{self.tracked[rel]['md5']}); push it with dvc push, or choose the remote that has it"
        )

    def fetch(self, rel, local_path):
        try:
            self.datafs.get_file(self.rpath(rel), local_path)
        except FileNotFoundError as exc:
            self.raise_if_unreachable(exc)
            raise self.missing(rel) from None
        except Exception as exc:
            self.raise_if_unreachable(exc)
            raise

    def sizes(self, rels):
        """Bytes of these tracked files, from DVC's listing or asked from the remote (check mode's byte count)."""
        total, odbs = 0, {}
        for rel in rels:
            item = self.tracked[rel]
            if item.get("size") is not None:
                total += item["size"]
                continue
            try:
                odb = odbs.get(item["hash"])
                if odb is None:
                    odb = odbs[item["hash"]] = self.fs.repo.cloud.get_remote_odb(self.remote, hash_name=item["hash"])
                total += odb.fs.size(odb.oid_to_path(item["md5"])) or 0
            except FileNotFoundError as exc:
                self.raise_if_unreachable(exc)
                size = self._size_in_cache(item)
                if size is None:
                    raise self.missing(rel) from None
                total += size
            except Exception as exc:  # cloud-versioned remotes and the like: a lower bound then
                self.raise_if_unreachable(exc)
                self.warn(
                    f"could not get the size of {self.rpath(rel)} from the remote ({exc}); "
                    "bytes_transferred counts only the known sizes"
                )
        return total

    def _size_in_cache(self, item):
        try:
            return os.path.getsize(self.fs.repo.cache.local.oid_to_path(item["md5"]))
        except Exception:  # no local cache (a URL repo) or not in it
            return None

    def close(self):
        from dvc.repo.open_repo import clean_repos

        try:
            self.fs.close()
        finally:
            clean_repos()  # the temporary clones DVC made for a URL repo
