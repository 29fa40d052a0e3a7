#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dvc_sync
short_description: Make a host path equal to a DVC-tracked dataset at a git revision
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
description:
  - Makes O(dest) on the target host hold exactly what a DVC-tracked O(path) of the DVC repository O(repo) holds
    at the git revision O(rev), downloading from the DVC remote with DVC's own Python API
    (C(dvc.api.DVCFileSystem)).
  - Idempotent by content, never by timestamps. Files are compared by DVC's md5 against the md5 of the files in
    O(dest). A manifest kept beside O(dest) (C(.<name>.dvc-sync.json)) caches each file's md5 with its size,
    mtime, ctime, inode and device, so unchanged files are not read again on every run; a file whose stat
    differs in any of these, or that may have changed in the same clock tick as the manifest was written, is
    hashed again. Only files whose content differs are downloaded.
  - Atomic. When O(path) is a directory, each version is built complete in a directory beside O(dest)
    (C(.<name>.<md5>-<random>), same filesystem; unchanged files are hardlinked from the live version, not
    copied, and the live version is never modified), every downloaded file is checked against DVC's md5, and
    O(dest) is a symlink to the live version, replaced by renaming a new symlink over it. A reader that resolves
    O(dest) once (C(realpath), or opens it as a directory) sees one whole version, never a mix; see
    docs/adr/0301-dvc-sync-atomic-swap.md. When O(dest) is a real directory at the first sync, it is exchanged
    with the symlink by C(renameat2(RENAME_EXCHANGE)) (Linux 3.15+), also atomic.
  - When O(path) is a single file, O(dest) is the file (or, when O(dest) is an existing directory, the file of
    the same name inside it), replaced by renaming a verified temporary file over it.
  - A failure (unknown O(rev), O(path) not tracked, unknown remote, a remote that cannot be reached or refuses the
    login, data missing on the remote, O(dest) not writable) changes nothing in O(dest). A remote that cannot be
    reached (host name does not resolve, connection refused, timeout, SSH login refused, host key not trusted) is
    reported as such, with the remote's name and url, never as data missing on it.
options:
  repo:
    description:
      - The DVC repository, as a git URL (C(https://...), C(ssh://...), C(git@host:org/repo.git), C(file://...)) or
        a local path of a checkout on the target host.
      - A URL is cloned by DVC into a temporary directory for the run (shallow when O(rev) is a branch or tag),
        with the target host's git credentials.
    type: str
    required: true
  rev:
    description:
      - Git revision to sync, a branch, tag or commit sha.
      - Default is the repository's default branch for a URL and C(HEAD) for a local checkout (never its
        uncommitted workspace, so what is synced is always a commit).
    type: str
  path:
    description:
      - The DVC-tracked path in the repository, relative to its root, a directory or a single file (a DVC
        output, or a path inside a tracked directory).
    type: str
    required: true
  dest:
    description:
      - The host path to make equal to O(path). Its parent directories are created when missing.
      - For a directory, O(dest) becomes a symlink to the live version directory beside it.
    type: path
    required: true
  remote:
    description:
      - Name of the DVC remote to download from, instead of the repository's default remote (C(core.remote)).
      - With O(remote_config), a name the repository does not define yet is defined for this run.
    type: str
  remote_config:
    description:
      - Options of the remote for this run, merged over the repository's configuration of O(remote) (or of the
        default remote), for example C(url), or credentials options of the remote's type.
      - For an SSH remote (C(ssh://user@host[:port]/path), needs C(dvc-ssh)), C(keyfile) is the path of the
        private key on the target host (checked before anything else), C(port) and C(user) override the url's,
        and C(timeout) bounds the connection (DVC's default is 1800 seconds). The host key must be in
        C(~/.ssh/known_hosts) of the user the module runs as.
      - Keep secrets (C(password), C(passphrase), cloud keys) out of it where possible, or set C(no_log) on the
        task, as module arguments are logged otherwise.
    type: dict
  delete:
    description:
      - Whether files in O(dest) that are not in the tracked version are removed.
      - With V(false) they are carried over into each new version (unless a tracked file needs their place).
    type: bool
    default: true
  keep_versions:
    description:
      - How many previous version directories stay beside O(dest) after a swap, so a reader that resolved
        O(dest) just before the swap can finish reading its version. Unchanged files are hardlinks, so a kept
        version costs only the space of the files that changed.
      - V(0) removes the previous version right after the swap.
    type: int
    default: 1
  jobs:
    description:
      - How many files are downloaded in parallel.
    type: int
    default: 4
  owner:
    description:
      - User (name or uid) that owns the synced files and directories. Default is the user the module runs as.
    type: str
  group:
    description:
      - Group (name or gid) of the synced files and directories.
    type: str
  mode:
    description:
      - Permissions of the synced files, as an octal string like V('0644') (symbolic modes are not supported).
      - Files DVC records as executable also get C(x) where they have C(r). Default is the umask's default.
    type: raw
  directory_mode:
    description:
      - Permissions of the synced directories (including the version directory), as an octal string like
        V('0755'). Default is V('0755') for the version directory and the umask's default below it.
    type: raw
  lock_timeout:
    description:
      - Seconds to wait for another sync of the same O(dest) (a C(flock) on C(.<name>.dvc-sync.lock)) to finish.
    type: float
    default: 300
attributes:
  check_mode:
    support: full
    details:
      - In check mode the module lists the tracked version, compares it with O(dest) and reports what would be
        added, updated and removed and how many bytes would be downloaded (sizes of files DVC does not list are
        asked from the remote, so data missing on the remote is reported as an error, as a real run would). It
        writes nothing, on O(dest) or beside it, and takes no lock.
  diff_mode:
    support: full
    details:
      - The diff shows the data version and, for each file added, updated or removed, its path and md5 before and
        after; unchanged files are counted, not listed.
requirements:
  - dvc >= 3.0 (with the package for the remote's type, for example C(dvc-ssh) or C(dvc-s3)) in the Python
    interpreter that runs the module on the target host; the C(sovereign.mlops.dvc_client) role installs
    C(dvc) and C(dvc-ssh) into C(/opt/sovereign/dvc)
  - git on the target host when O(repo) is a URL
notes:
  - The module runs on the target host, with the interpreter that has C(dvc) installed, so point
    C(ansible_python_interpreter) at it, for example a venv C(/opt/sovereign/dvc/bin/python).
  - Remote credentials are those DVC finds on the target host (the repository's config, O(remote_config),
    environment variables, C(~/.aws), SSH keys, ...).
  - Readers that need a whole dataset must resolve O(dest) once and read below the result
    (C(os.path.realpath(dest)), C(cd dest && ...) with C(pwd -P), or a directory file descriptor); every
    separate lookup through the symlink may see a newer version after a swap.
  - A version is removed O(keep_versions) swaps after it stopped being live (renamed away, then deleted). A
    reader still inside it then can miss files, so keep O(keep_versions) at 1 or more when readers may take
    longer than the time between two syncs.
  - O(mode), O(owner) and O(group) changes never modify the live version either; files whose attributes differ
    are copied into the new version.
seealso:
  - name: DVC Python API, DVCFileSystem
    description: The API this module uses to list and download the tracked data.
    link: https://dvc.org/doc/api-reference/dvcfilesystem
"""

EXAMPLES = r"""
- name: Sync the training set of the pinned data release
  sovereign.mlops.dvc_sync:
    repo: https://git.example.internal/ml/datasets.git
    rev: v2.3.0
    path: data/train
    dest: /srv/datasets/train
    owner: sovereign
    group: sovereign
  vars:
    ansible_python_interpreter: /opt/sovereign/dvc/bin/python
  register: train_data

- name: Record the data version for the ledger
  ansible.builtin.debug:
    msg: "{{ train_data.data_version.rev }} {{ train_data.data_version.md5 }}"

- name: What would change? (nothing is written)
  sovereign.mlops.dvc_sync:
    repo: /srv/checkouts/datasets
    rev: main
    path: data/train
    dest: /srv/datasets/train
  check_mode: true
  diff: true

- name: Sync from a DVC remote on the storage host over SSH (key only)
  sovereign.mlops.dvc_sync:
    repo: /srv/checkouts/datasets
    rev: v2.3.0
    path: data/train
    dest: /srv/datasets/train
    remote: storage
    remote_config:
      url: ssh://dvcstore@storage.example.internal/srv/dvc-remote
      keyfile: /root/.ssh/dvc-storage  # on the target host, mode 0600
      timeout: 30
  vars:
    ansible_python_interpreter: /opt/sovereign/dvc/bin/python  # sovereign.mlops.dvc_client

- name: One model file from a second remote, keeping files others put in dest
  sovereign.mlops.dvc_sync:
    repo: git@git.example.internal:ml/models.git
    path: models/encoder.pt
    dest: /srv/models/encoder.pt
    remote: backup
    remote_config:
      url: /mnt/nfs/dvc-backup
    mode: '0444'
"""

RETURN = r"""
added:
  description: Paths (relative to O(dest)) that were not in O(dest) and are now (or would be, in check mode).
  returned: success
  type: list
  elements: str
  sample: [images/0003.png]
updated:
  description: Paths whose content differed and was replaced.
  returned: success
  type: list
  elements: str
  sample: [labels.csv]
removed:
  description: Paths removed because they are not in the tracked version (O(delete)), or stand where the tracked
    version needs another file or directory.
  returned: success
  type: list
  elements: str
  sample: [images/0002.png]
attributes_changed:
  description: Paths with the right content whose owner, group or mode were corrected.
  returned: success
  type: list
  elements: str
  sample: []
bytes_transferred:
  description: Bytes downloaded (in check mode, that would be downloaded).
  returned: success
  type: int
  sample: 1048576
data_version:
  description: What O(dest) holds now (or would hold, in check mode).
  returned: success
  type: dict
  contains:
    repo:
      description: O(repo) as given.
      type: str
    rev:
      description: O(rev) resolved to a commit sha.
      type: str
      sample: 9fceb02d0ae598e95dc970b74767f19372d61af8
    requested_rev:
      description: O(rev) as given (V(null) for the default).
      type: str
    path:
      description: O(path) as given.
      type: str
    md5:
      description: DVC's md5 of O(path), the C(.dir) hash for a directory (computed the way DVC does for a
        directory inside a tracked directory), the file's md5 for a file.
      type: str
      sample: 072c6be4adb0d0d8cc0f0f29dca20b80.dir
    nfiles:
      description: Number of files.
      type: int
    type:
      description: V(directory) or V(file).
      type: str
files_hashed:
  description: How many files in O(dest) were read to compute their md5 (the others' md5 came from the manifest).
  returned: success
  type: int
  sample: 0
dest:
  description: The real path of the data, the live version directory O(dest) links to for a directory, the file
    for a file. In check mode, the current one.
  returned: success
  type: str
  sample: /srv/datasets/.train.072c6be4adb0-5f3a91c2
link:
  description: O(dest) as an absolute path (for a directory, the symlink readers use).
  returned: success
  type: str
  sample: /srv/datasets/train
"""

import grp
import os
import pwd
import shutil
import stat
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.sovereign.mlops.plugins.module_utils._dvc import (
    DVC_IMPORT_ERROR,
    TrackedData,
    stdout_to_stderr,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._dvc_sync_errors import SyncError, explain
from ansible_collections.sovereign.mlops.plugins.module_utils._versioned_dest import (
    DestLock,
    HashCache,
    Layout,
    attrs_ok,
    build_version,
    check_writable_parent,
    file_md5,
    file_mode,
    fsync_dir,
    fsync_tree,
    load_manifest,
    manifest_files,
    plan_tree,
    prune,
    save_manifest,
    scan_tree,
    set_attrs,
    swap_in,
)


def parse_mode(module, name):
    value = module.params[name]
    if value is None:
        return None
    if isinstance(value, int):
        mode = value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            module.fail_json(
                msg=f"{name} must be an octal string like '0644', got {value!r} (symbolic modes are not supported)"
            )
    if not 0 <= mode <= 0o7777:
        module.fail_json(msg=f"{name} {oct(mode)} is out of range")
    return mode


def resolve_ids(module):
    uid = gid = None
    owner, group = module.params["owner"], module.params["group"]
    if owner is not None:
        try:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            module.fail_json(msg=f"owner '{owner}' does not exist on this host; create the user first")
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            module.fail_json(msg=f"group '{group}' does not exist on this host; create the group first")
    return uid, gid


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def wanted_attrs(module):
    uid, gid = resolve_ids(module)
    return dict(
        uid=uid,
        gid=gid,
        mode=parse_mode(module, "mode"),
        directory_mode=parse_mode(module, "directory_mode"),
        umask=current_umask(),
    )


class Sync:
    def __init__(self, module, source, attrs):
        p = module.params
        self.module = module
        self.source = source
        self.attrs = attrs
        self.delete = p["delete"]
        self.jobs = p["jobs"]
        self.keep = p["keep_versions"]
        self.old_manifest = {}
        self.result = dict(
            changed=False, added=[], updated=[], removed=[], attributes_changed=[], bytes_transferred=0, files_hashed=0
        )

    def data_version(self):
        s = self.source
        return dict(
            repo=s.repo,
            rev=s.sha,
            requested_rev=s.requested_rev,
            path=s.path,
            md5=s.md5,
            nfiles=len(s.tracked),
            type=s.kind,
        )

    def finish(self, plan, before_files, real_dest, link, cache, root=None):
        r = self.result
        r.update(
            added=plan["added"],
            updated=plan["updated"],
            removed=plan["removed"],
            attributes_changed=plan["attributes"],
            changed=plan["changed"],
            data_version=self.data_version(),
            dest=real_dest,
            link=link,
        )
        if self.module._diff:
            r["diff"] = self.diff(plan, before_files, cache, root)
        r["files_hashed"] = len(cache.hashed)
        return r

    def diff(self, plan, before_files, cache, root):
        s, dest = self.source, self.module.params["dest"]
        old = self.old_manifest
        before = [f"# {dest}"]
        if old.get("rev") or old.get("md5"):
            before.append(f"# data version: {old.get('rev')} {old.get('md5')}")
        after = [f"# {dest}", f"# data version: {s.sha} {s.md5}"]
        for rel in sorted(set(plan["updated"]) | set(plan["removed"]) | set(plan["attributes"])):
            have = before_files.get(rel, {})
            md5 = have.get("md5")
            if md5 is None and have.get("kind") == "file" and root:  # an untracked file: hashed for the diff only
                md5 = cache.md5(rel, os.path.join(root, rel), have["st"], "md5")
            before.append(f"{rel or os.path.basename(dest)} {md5 or '(' + have.get('kind', '-') + ')'}")
        for rel in sorted(set(plan["added"]) | set(plan["updated"]) | set(plan["attributes"])):
            after.append(f"{rel or os.path.basename(dest)} {s.tracked[rel]['md5']}")
        note = f"# {len(plan['link'])} unchanged file(s) not listed"
        return dict(before="\n".join([*before, note]) + "\n", after="\n".join([*after, note]) + "\n")

    # -- directories ---------------------------------------------------------------------------------------------

    def run_directory(self):
        module = self.module
        layout = Layout(module.params["dest"])
        if layout.state() in ("file", "other"):
            raise SyncError(
                f"dest {layout.dest} exists and is not a directory or a symlink to one: remove it or "
                "choose another dest"
            )
        error = check_writable_parent(layout)
        if error:
            raise SyncError(error)
        if module.check_mode:
            self.old_manifest = load_manifest(layout)
            return self._plan_directory(layout)[0]

        os.makedirs(layout.parent, exist_ok=True)
        with DestLock(layout, module.params["lock_timeout"]):
            self.old_manifest = load_manifest(layout)
            result, plan, current_root, cache = self._plan_directory(layout)
            current = layout.current_version()
            history = [v for v in self.old_manifest.get("history", []) if isinstance(v, str)]
            if not plan["changed"]:
                if cache.hashed and current:
                    # Refreshes the md5 cache; not a change.
                    self._save(layout, current, history, manifest_files(current_root, self.source.tracked))
                return result
            version = self._build(layout, current_root, plan)
            aside, warning = swap_in(layout, version)
            if warning:
                module.warn(warning)
            if aside:
                history = [os.path.basename(aside), *history]
            elif current:
                history = [current, *(v for v in history if v != current)]
            history = prune(layout, version, history, self.keep)
            self._save(layout, version, history, manifest_files(layout.sibling(version), self.source.tracked))
            result["dest"] = layout.sibling(version)
            return result

    def _plan_directory(self, layout):
        state = layout.state()
        current_root = os.path.realpath(layout.dest) if state in ("dir", "link") else None
        current = layout.current_version()
        cache = HashCache()
        if current and self.old_manifest.get("version") == current:
            cache = HashCache(self.old_manifest.get("files"), self.old_manifest.get("_written_ns"))
        local = scan_tree(current_root, self.source.tracked, cache)
        plan = plan_tree(self.source.tracked, local, self.delete, self.attrs)
        if self.module.check_mode:
            self.result["bytes_transferred"] = self.source.sizes(plan["fetch"])
        result = self.finish(plan, local, current_root or layout.dest, layout.dest, cache, current_root)
        return result, plan, current_root, cache

    def _build(self, layout, current_root, plan):
        """The new version, complete and flushed, under its final name beside dest (not yet live)."""
        source = self.source
        staging = layout.temp("tmp")
        os.mkdir(staging, 0o700)
        try:
            self.result["bytes_transferred"] = build_version(
                staging, current_root, source.tracked, plan, self.attrs, source.fetch, self.jobs
            )
            fsync_tree(staging)
            version = layout.version_name(source.md5)
            os.rename(staging, layout.sibling(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def _save(self, layout, version, history, files):
        s = self.source
        save_manifest(
            layout, dict(repo=s.repo, rev=s.sha, path=s.path, md5=s.md5, version=version, history=history, files=files)
        )

    # -- single files --------------------------------------------------------------------------------------------

    def run_file(self):
        module, source = self.module, self.source
        dest = os.path.abspath(module.params["dest"])
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(source.path))
        if os.path.isdir(dest):
            raise SyncError(
                f"dest {dest} is a directory but path {source.path} is a file: remove it or choose another dest"
            )
        layout = Layout(dest)
        error = check_writable_parent(layout)
        if error:
            raise SyncError(error)
        if module.check_mode:
            self.old_manifest = load_manifest(layout)
            plan, local, cache = self._plan_file(dest)
            self.result["bytes_transferred"] = source.sizes(plan["fetch"])
            return self.finish(plan, local, dest, dest, cache)

        os.makedirs(layout.parent, exist_ok=True)
        with DestLock(layout, module.params["lock_timeout"]):
            self.old_manifest = load_manifest(layout)
            plan, local, cache = self._plan_file(dest)
            result = self.finish(plan, local, dest, dest, cache)
            item = source.tracked[""]
            if plan["fetch"]:
                self.result["bytes_transferred"] = self._replace_file(layout, item)
            elif plan["copy"]:  # right content, other owner/mode: one chmod/chown is atomic enough
                st = os.lstat(dest)
                set_attrs(
                    dest, self.attrs["uid"], self.attrs["gid"], file_mode(item, self.attrs, stat.S_IMODE(st.st_mode))
                )
            if plan["changed"] or cache.hashed:
                files = manifest_files(layout.parent, {layout.name: item})
                self._save(layout, "file", [], {"": files[layout.name]})
            return result

    def _plan_file(self, dest):
        item = self.source.tracked[""]
        cache = HashCache()
        if self.old_manifest.get("version") == "file":
            cache = HashCache(self.old_manifest.get("files"), self.old_manifest.get("_written_ns"))
        local = {}
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            local[""] = dict(kind="file", st=st, md5=cache.md5("", dest, st, item["hash"]))
        elif st is not None:
            local[""] = dict(kind="other", st=st)
        plan = plan_tree(self.source.tracked, local, True, self.attrs)
        if plan["copy"] and attrs_ok(local[""]["st"], item, self.attrs):
            plan["copy"] = []
        return plan, local, cache

    def _replace_file(self, layout, item):
        """Download to a temporary file beside dest, verify it, then rename it over dest (atomic)."""
        source = self.source
        tmp = layout.temp("tmp")
        try:
            source.fetch("", tmp)
            got = file_md5(tmp, item["hash"])
            if got != item["md5"]:
                raise SyncError(
                    f"downloaded {source.path} has md5 {got} but DVC records {item['md5']}: the remote "
                    "holds corrupt data; re-push it from a good copy"
                )
            set_attrs(
                tmp,
                self.attrs["uid"],
                self.attrs["gid"],
                file_mode(item, self.attrs, stat.S_IMODE(os.lstat(tmp).st_mode)),
            )
            with open(tmp, "rb") as fobj:
                os.fsync(fobj.fileno())
            size = os.path.getsize(tmp)
            os.rename(tmp, layout.dest)
            fsync_dir(layout.parent)
            return size
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repo=dict(type="str", required=True),
            rev=dict(type="str"),
            path=dict(type="str", required=True),
            dest=dict(type="path", required=True),
            remote=dict(type="str"),
            remote_config=dict(type="dict"),
            delete=dict(type="bool", default=True),
            keep_versions=dict(type="int", default=1),
            jobs=dict(type="int", default=4),
            owner=dict(type="str"),
            group=dict(type="str"),
            mode=dict(type="raw"),
            directory_mode=dict(type="raw"),
            lock_timeout=dict(type="float", default=300),
        ),
        supports_check_mode=True,
    )
    if DVC_IMPORT_ERROR:
        module.fail_json(
            msg=missing_required_lib(
                "dvc",
                reason="to read DVC repositories; install it in the Python that ansible_python_interpreter points at",
            ),
            exception=DVC_IMPORT_ERROR,
        )
    p = module.params
    if p["jobs"] < 1:
        module.fail_json(msg=f"jobs must be at least 1, got {p['jobs']}")
    if p["keep_versions"] < 0:
        module.fail_json(msg=f"keep_versions must be 0 or more, got {p['keep_versions']}")
    if not p["path"].strip("/"):
        module.fail_json(msg="path must name a DVC-tracked directory or file inside the repository, not its root")

    keyfile = (p["remote_config"] or {}).get("keyfile")
    # A "~/..." keyfile is left to DVC (it expands it); an absolute or relative one is checked here.
    if keyfile and not str(keyfile).startswith("~") and not os.path.isfile(str(keyfile)):
        module.fail_json(
            msg=f"remote_config keyfile {keyfile} does not exist on the target host: the remote is reached from "
            "there, so copy the private key to the host first (mode 0600)"
        )

    attrs = wanted_attrs(module)

    source = result = failure = None
    with stdout_to_stderr():  # one redirect for the whole run: DVC works in threads, redirects do not nest there
        try:
            source = TrackedData(p["repo"], p["path"], p["rev"], p["remote"], p["remote_config"], warn=module.warn)
            source.load()
            sync = Sync(module, source, attrs)
            result = sync.run_directory() if source.kind == "directory" else sync.run_file()
        except SyncError as exc:
            failure = dict(msg=str(exc))
        except Exception as exc:
            msg = explain(exc, p, source.describe_remote if source is not None else None)
            failure = dict(msg=msg, exception=traceback.format_exc())
        finally:
            if source is not None:
                source.close()
    if failure:
        module.fail_json(**failure)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
