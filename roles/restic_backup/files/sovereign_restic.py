"""restic backups from ZFS snapshots, with PostgreSQL dumps, checks and restore drills (ARCHITECTURE §8).

    sovereign-restic [--config FILE] init                 initialise a repository that does not exist
    sovereign-restic [--config FILE] backup               ZFS snapshot -> pg_dump -> restic backup -> forget --prune
    sovereign-restic [--config FILE] check [--all]        rolling restic check --read-data-subset=n/N
    sovereign-restic [--config FILE] drill                restore the newest snapshot to scratch and compare
    sovereign-restic [--config FILE] restore --dataset DS --into DIR [--database DB] [--snapshot ID]
    sovereign-restic [--config FILE] restic REPO ARGS...  run restic against a configured repository

Scheduled runs go through sovereign-job (roles/_common), which keeps two runs apart (--lock), bounds
them (--timeout) and writes the textfile metrics; this program appends its own samples to the file named
by SOVEREIGN_JOB_METRICS_FILE. Written by the sovereign.mlops.restic_backup role; Python standard
library only. Every failure is one line naming what failed and, where known, the fix.
"""

import argparse
import datetime
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

CONFIG = "/etc/sovereign/restic/config.json"


class Failure(Exception):
    """A failure with a message for on-call; the program exits 1 with it."""


def say(msg):
    print(msg, flush=True)


def warn(msg):
    print(f"sovereign-restic: {msg}", file=sys.stderr, flush=True)


class Metrics:
    """Samples appended to the wrapper's metrics file (or only printed when run by hand)."""

    def __init__(self):
        self.path = os.environ.get("SOVEREIGN_JOB_METRICS_FILE", "")

    def add(self, name, value, **labels):
        label_text = ",".join(f'{k}="{v!s}"' for k, v in sorted(labels.items()))
        line = (
            f"sovereign_restic_{name}{{{label_text}}} {float(value):g}\n"
            if labels
            else f"sovereign_restic_{name} {float(value):g}\n"
        )
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)


METRICS = Metrics()


def run(cmd, *, env=None, check=True, capture=True, stdin=None, timeout=None):
    res = subprocess.run(
        cmd,
        env=env,
        check=False,
        text=True,
        stdin=stdin,
        timeout=timeout,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout or "").strip().splitlines()
        raise Failure(f"{' '.join(cmd[:3])} ... failed (rc {res.returncode}): {' / '.join(detail[-3:])}")
    return res


def utcnow():
    return datetime.datetime.now(datetime.UTC)


# ---------------------------------------------------------------- repositories


class Repo:
    def __init__(self, cfg, spec):
        self.cfg = cfg
        self.name = spec["name"]
        self.url = spec["url"]
        self.options = spec.get("options", [])
        self.env = dict(os.environ)
        self.env.update(spec.get("env", {}))
        self.env["RESTIC_PASSWORD_FILE"] = cfg["password_file"]
        self.env["RESTIC_CACHE_DIR"] = cfg["cache_dir"]
        self.probe_host = spec.get("probe_host", "")
        self.probe_port = int(spec.get("probe_port", 0) or 0)

    @property
    def address(self):
        return f"{self.probe_host}:{self.probe_port}" if self.probe_host else self.url

    def restic(self, *args, check=True, capture=True, timeout=None):
        cmd = ["restic", "-r", self.url, *self.options, *args]
        res = subprocess.run(
            cmd,
            env=self.env,
            text=True,
            check=False,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
        )
        if check and res.returncode != 0:
            raise Failure(
                f"restic {args[0]} on repository {self.name} ({self.address}) failed (rc {res.returncode}): "
                + " / ".join((res.stderr or "").strip().splitlines()[-4:])
            )
        return res

    def probe(self):
        """Fail within connect_timeout naming host and port when the repository host does not answer."""
        if not self.probe_host:
            return
        timeout = float(self.cfg.get("connect_timeout", 10))
        started = time.monotonic()
        try:
            with socket.create_connection((self.probe_host, self.probe_port), timeout=timeout):
                pass
        except socket.gaierror as exc:
            why = f"the name {self.probe_host} does not resolve ({exc.strerror})"
        except ConnectionRefusedError:
            why = "connection refused (nothing listens there)"
        except TimeoutError:
            why = f"no answer within {timeout:g} s"
        except OSError as exc:
            why = exc.strerror or str(exc)
        else:
            METRICS.add("repository_reachable", 1, repository=self.name, address=self.address)
            return
        METRICS.add("repository_reachable", 0, repository=self.name, address=self.address)
        raise Failure(
            f"cannot reach the repository {self.name} at {self.address}: {why} "
            f"(after {time.monotonic() - started:.1f} s); nothing was changed locally. "
            f"Check that the host is up and sshd listens on port {self.probe_port}."
        )

    def state(self):
        """'ok', 'missing' or raises: a wrong password is an error, never a reason to initialise."""
        res = self.restic("cat", "config", "--no-lock", check=False, timeout=300)
        if res.returncode == 0:
            return "ok"
        err = (res.stderr or "").strip()
        low = err.lower()
        if "wrong password" in low or "no key found" in low:
            raise Failure(
                f"repository {self.name} at {self.url} exists but the password does not open it: "
                "restic_backup_password is not the one it was initialised with (wrong password or no "
                "key found). Nothing was initialised; set the repository's password from vault."
            )
        if "is there a repository at the following location" in low or "does not exist" in low or "no such file" in low:
            return "missing"
        raise Failure(f"cannot open repository {self.name} at {self.url}: " + " / ".join(err.splitlines()[-3:]))

    def remove_stale_locks(self):
        """Name and remove locks left by a killed run: this host's with a dead pid, or older than the run timeout."""
        res = self.restic("list", "locks", "--no-lock", check=False, timeout=300)
        if res.returncode != 0:
            return 0
        max_age = float(self.cfg.get("stale_lock_age", 14400))
        # restic records the kernel's host name in its locks (not the inventory name).
        host = socket.gethostname()
        stale = []
        for lock_id in res.stdout.split():
            info = self.restic("cat", "lock", lock_id, "--no-lock", check=False, timeout=300)
            if info.returncode != 0:
                continue
            try:
                lock = json.loads(info.stdout)
            except ValueError:
                continue
            age = lock_age(lock.get("time", ""))
            pid = int(lock.get("pid", 0) or 0)
            dead = lock.get("hostname") == host and pid > 0 and not pid_alive(pid)
            if dead or age > max_age:
                why = (
                    f"pid {pid} on {lock.get('hostname')} is gone"
                    if dead
                    else f"it is {age:.0f} s old (> {max_age:.0f} s)"
                )
                stale.append(lock_id)
                say(
                    f"repository {self.name}: removing stale restic lock {lock_id[:8]} "
                    f"({'exclusive' if lock.get('exclusive') else 'shared'}, created {lock.get('time', '?')} "
                    f"by pid {pid} on {lock.get('hostname')}): {why}"
                )
        if stale:
            # restic unlock removes exactly the locks restic itself considers stale (this host's with a dead
            # pid, or older than 30 min; stale_lock_age is at least that), never a live run's lock.
            self.restic("unlock", timeout=300)
            left = set(self.restic("list", "locks", "--no-lock", timeout=300).stdout.split())
            kept = [lock_id[:8] for lock_id in stale if lock_id in left]
            if kept:
                raise Failure(
                    f"repository {self.name}: restic unlock left the stale locks {', '.join(kept)}; "
                    "remove them by hand with: sovereign-restic restic " + self.name + " unlock --remove-all "
                    "(only when no restic runs against the repository)"
                )
        METRICS.add("stale_locks_removed", len(stale), repository=self.name)
        return len(stale)


def lock_age(stamp):
    if not stamp:
        return 0.0
    try:
        head, _dot, rest = stamp.partition(".")
        zone = ""
        for sep in ("Z", "+", "-"):
            if sep in rest:
                zone = rest[rest.index(sep) :]
                break
        if not rest:
            head, zone = stamp[:19], stamp[19:]
        zone = "+00:00" if zone in ("Z", "") else zone
        when = datetime.datetime.fromisoformat(head[:19] + zone)
        return (utcnow() - when).total_seconds()
    except ValueError:
        return 0.0


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def repos(cfg, only=None):
    found = [Repo(cfg, spec) for spec in cfg["repositories"]]
    if only:
        found = [r for r in found if r.name == only]
        if not found:
            raise Failure(
                f"no repository named {only}; configured: {', '.join(s['name'] for s in cfg['repositories'])}"
            )
    return found


# ---------------------------------------------------------------- ZFS


def esc(dataset):
    return dataset.replace("/", "_")


def mount_path(cfg, dataset, purpose="backup"):
    """backup: the fixed path restic backs up (and restores to); drill: where the drill reads its source."""
    return os.path.join(cfg["work_dir"], "mnt" if purpose == "backup" else "drill-source", esc(dataset))


def clone_name(dataset, purpose="backup"):
    """The clone's own name per purpose, so a drill never destroys the clone a running backup reads."""
    pool = dataset.split("/", 1)[0]
    return f"{pool}/sovereign-restic-{purpose}-{esc(dataset)}"


def zfs(*args, check=True):
    return run(["zfs", *args], check=check)


def snapshots_of(dataset, prefix):
    res = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation", "-r", dataset)
    names = [line.strip() for line in res.stdout.splitlines() if line.startswith(dataset + "@")]
    return [n.split("@", 1)[1] for n in names if n.split("@", 1)[1].startswith(prefix)]


def mounted_here(path, name, mountinfo="/proc/self/mountinfo"):
    """Whether this process's mount namespace has NAME mounted at PATH (/proc/self/mountinfo).

    OpenZFS's zfs(8) mounts in the caller's namespace; zfs-fuse's daemon mounts in its own, which a systemd unit
    with a private mount namespace (PrivateTmp, ProtectHome, ...) does not see: README, "zfs-fuse".
    """
    try:
        with open(mountinfo, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        # Another process's mountinfo: gone with it. Our own: only the plain mount-point test is left.
        return mountinfo == "/proc/self/mountinfo" and os.path.ismount(path)
    for line in lines:
        fields, _sep, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        # mountinfo escapes blanks in paths as octal (\040); our paths have none.
        if len(parts) > 4 and len(rest) > 1 and parts[4] == path and name in (None, rest[1]):
            return True
    return False


def holders(path):
    """What keeps PATH busy, for on-call's message (best effort): 'pid N (comm): cwd|root|exe|open file ...' per
    process, and 'mounted in mount namespace mnt:[...] (pids ...)' per other namespace that has PATH mounted."""
    own_ns = os.readlink("/proc/self/ns/mnt")
    found, namespaces = [], {}
    prefix = path.rstrip("/") + "/"
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        base = f"/proc/{pid}"
        try:
            with open(f"{base}/comm", encoding="utf-8") as fh:
                comm = fh.read().strip()
            how = []
            for link in ("cwd", "root", "exe"):
                try:
                    target = os.readlink(f"{base}/{link}")
                except OSError:
                    continue
                if target == path or target.startswith(prefix):
                    how.append(link)
            try:
                fds = os.listdir(f"{base}/fd")
            except OSError:
                fds = []
            for fd in fds:
                try:
                    target = os.readlink(f"{base}/fd/{fd}")
                except OSError:
                    continue
                if target == path or target.startswith(prefix):
                    how.append(f"open file {target}")
                    break
            ns = os.readlink(f"{base}/ns/mnt")
            if ns != own_ns and (ns in namespaces or mounted_here(path, None, f"{base}/mountinfo")):
                namespaces.setdefault(ns, []).append(f"{pid} ({comm})")
        except OSError:
            continue
        if how:
            found.append(f"pid {pid} ({comm}): {', '.join(how)}")
    for ns, pids in sorted(namespaces.items()):
        more = f" and {len(pids) - 3} more" if len(pids) > 3 else ""
        found.append(f"mounted in mount namespace {ns} (pids {', '.join(pids[:3])}{more})")
    return found


def drop_clone(cfg, dataset, purpose="backup"):
    """Unmount and destroy the clone; returns '' when it is gone, else why it is still there.

    zfs-fuse's daemon releases a just-read clone a moment after the unmount (seconds under load), and answers
    "dataset is busy" until then: the destroy is retried until clone_destroy_timeout. A clone still there then
    is kept for the next run to remove (sovereign_restic_clone_left says so); the holders are named.
    """
    name = clone_name(dataset, purpose)
    if zfs("list", "-H", "-o", "name", name, check=False).returncode != 0:
        return ""
    path = mount_path(cfg, dataset, purpose)
    timeout = float(cfg.get("clone_destroy_timeout", 120))
    held = []
    if mounted_here(path, name):
        if zfs("unmount", name, check=False).returncode != 0:
            # Named now: after a forced (detaching) unmount a holder's cwd no longer reads as under the path.
            held = holders(path)
            warn(f"the clone {name} at {path} is busy ({'; '.join(held) or 'no holder found'}): unmounting by force")
            zfs("unmount", "-f", name, check=False)
    elif any(h.startswith("mounted in mount namespace") for h in holders(path)):
        # Mounted only in a namespace this process cannot unmount it from: waiting would not help.
        timeout = 0
    deadline = time.monotonic() + timeout
    pause, last = 0.2, ""
    while True:
        res = zfs("destroy", "-f", name, check=False)
        if res.returncode == 0:
            return ""
        last = (res.stderr or res.stdout or "").strip().splitlines()[-1:] or ["no message"]
        if time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 5.0)
    busy = holders(path) or [f"held before the forced unmount by {h}" for h in held]
    return f"{last[0]}; {'; '.join(busy) if busy else 'no process holds ' + path}"


def mount_snapshot(cfg, dataset, snap, purpose="backup"):
    """A read-only clone of dataset@snap mounted at the dataset's fixed path under work_dir/mnt.

    zfs-fuse (molecule, lab) has no .zfs/snapshot directory; a clone works on OpenZFS and zfs-fuse alike
    (docs/adr/1120-restic-backups-from-zfs-clones.md). The path is the same every run, so restic finds
    its parent snapshot and reads only what changed. The clone must be mounted in this process's own mount
    namespace, or restic would read an empty directory (docs/adr/1130-zfs-fuse-clones-and-mount-namespaces.md).
    """
    name = clone_name(dataset, purpose)
    if zfs("list", "-H", "-o", "name", name, check=False).returncode == 0:
        why = drop_clone(cfg, dataset, purpose)
        if why:
            raise Failure(
                f"the clone {name} an earlier run left behind cannot be destroyed ({why}); end what holds it, "
                f"then: zfs destroy -f {name}"
            )
        say(f"removed the clone {name} an earlier run left behind")
    path = mount_path(cfg, dataset, purpose)
    os.makedirs(path, mode=0o700, exist_ok=True)
    zfs("clone", "-o", "readonly=on", "-o", f"mountpoint={path}", f"{dataset}@{snap}", name)
    if not mounted_here(path, name):
        zfs("mount", name, check=False)
    if not mounted_here(path, name):
        drop_clone(cfg, dataset, purpose)
        raise Failure(
            f"the clone {name} of {dataset}@{snap} is not mounted at {path} in this process's mount namespace, so "
            "there is nothing to read from it; nothing was backed up from it. zfs-fuse mounts in its daemon's "
            "namespace, which a unit with PrivateTmp/ProtectHome does not see: converge the restic_backup role "
            "after zfs_datasets (it gives the units no mount namespace of their own under zfs-fuse)"
        )
    return path


def record_clones(cfg, datasets, purpose):
    """Destroy this run's clones; one that stays is named and counted, and the next run removes it."""
    for dataset in datasets:
        why = drop_clone(cfg, dataset, purpose)
        if why:
            warn(f"the clone {clone_name(dataset, purpose)} could not be destroyed ({why}); the next run removes it")
        METRICS.add("clone_left", 1 if why else 0, dataset=dataset, purpose=purpose)


# ---------------------------------------------------------------- PostgreSQL

COUNT_SQL = r"""
SELECT format('SELECT %L || ''|'' || count(*) FROM %I.%I', table_schema || '.' || table_name, table_schema, table_name)
  FROM information_schema.tables
 WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')
 ORDER BY table_schema, table_name
\gexec
"""


def psql(db, script):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(script)
    os.chmod(fh.name, 0o644)
    try:
        res = run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db,
                "-f",
                fh.name,
            ]
        )
    finally:
        os.unlink(fh.name)
    return res.stdout


def parse_counts(text):
    counts = {}
    for line in text.splitlines():
        if "|" in line:
            name, value = line.rsplit("|", 1)
            counts[name] = int(value)
    return counts


def dump_database(cfg, db):
    """pg_dump --format=custom in the same MVCC snapshot as the row counts the drill compares with."""
    out_dir = os.path.join(cfg["staging_dir"], "postgresql")
    final = os.path.join(out_dir, f"{db}.dump")
    tmp = final + ".tmp"
    for path in (tmp, final):
        if os.path.exists(path):
            os.unlink(path)
    script = (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n"
        "SELECT pg_export_snapshot() AS snap \\gset\n"
        "\\setenv SOVEREIGN_SNAPSHOT :snap\n"
        f"\\! pg_dump --format=custom --snapshot=\"$SOVEREIGN_SNAPSHOT\" --file='{tmp}' '{db}'"
        f" && mv '{tmp}' '{final}'\n" + COUNT_SQL + "COMMIT;\n"
    )
    counts = parse_counts(psql(db, script))
    if not os.path.isfile(final):
        raise Failure(f"pg_dump of database {db} failed (no {final}); see the journal of this unit for pg_dump's error")
    with open(os.path.join(out_dir, f"{db}.rowcounts.json"), "w", encoding="utf-8") as fh:
        json.dump(counts, fh, indent=1, sort_keys=True)
    return final, counts


# ---------------------------------------------------------------- commands


def cmd_init(cfg, args):
    for repo in repos(cfg, args.repository):
        repo.probe()
        if repo.state() == "ok":
            say(f"repository {repo.name} at {repo.url}: exists, the password opens it")
            continue
        repo.restic("init", timeout=600)
        say(f"repository {repo.name} at {repo.url}: initialised")


def cmd_backup(cfg, args):
    targets = repos(cfg, args.repository)
    for repo in targets:
        repo.probe()
        if repo.state() != "ok":
            raise Failure(
                f"repository {repo.name} at {repo.url} does not exist: converge the restic_backup role "
                "(it initialises it) before the first backup"
            )
    snap = cfg["snapshot_prefix"] + utcnow().strftime("%Y%m%dT%H%M%SZ")
    paths, manifest = [], {"zfs_snapshot": snap, "datasets": {}, "databases": {}, "host": cfg["host"]}
    for dataset in cfg["datasets"]:
        zfs("snapshot", f"{dataset}@{snap}")
    say(f"took ZFS snapshot @{snap} of {', '.join(cfg['datasets']) or '(no datasets)'}")
    try:
        for db in cfg["databases"]:
            dump, counts = dump_database(cfg, db)
            manifest["databases"][db] = {"dump": dump, "tables": len(counts), "rows": sum(counts.values())}
            say(
                f"dumped database {db}: {len(counts)} tables, {sum(counts.values())} rows, "
                f"{os.path.getsize(dump)} bytes"
            )
        for dataset in cfg["datasets"]:
            path = mount_snapshot(cfg, dataset, snap)
            manifest["datasets"][dataset] = path
            paths.append(path)
        with open(os.path.join(cfg["staging_dir"], "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
        paths.append(cfg["staging_dir"])
        for repo in targets:
            backup_to(cfg, repo, paths, snap)
    finally:
        record_clones(cfg, cfg["datasets"], "backup")
        prune_zfs(cfg)


def backup_to(cfg, repo, paths, snap):
    repo.remove_stale_locks()
    res = repo.restic(
        "backup",
        "--json",
        "--host",
        cfg["host"],
        "--tag",
        "sovereign",
        "--tag",
        f"zfs:{snap}",
        *[a for ex in cfg.get("exclude", []) for a in ("--exclude", ex)],
        *paths,
        check=False,
    )
    summary = {}
    for line in res.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("message_type") == "summary":
            summary = msg
    if res.returncode != 0 or not summary:
        METRICS.add("backup_success", 0, repository=repo.name)
        raise Failure(
            f"restic backup to {repo.name} ({repo.address}) failed (rc {res.returncode}): "
            + " / ".join((res.stderr or "").strip().splitlines()[-4:])
        )
    METRICS.add("backup_success", 1, repository=repo.name)
    METRICS.add("backup_bytes_added", summary.get("data_added", 0), repository=repo.name)
    METRICS.add("backup_bytes_processed", summary.get("total_bytes_processed", 0), repository=repo.name)
    METRICS.add("backup_files", summary.get("total_files_processed", 0), repository=repo.name)
    METRICS.add("backup_files_new", summary.get("files_new", 0), repository=repo.name)
    METRICS.add("backup_files_changed", summary.get("files_changed", 0), repository=repo.name)
    say(
        f"stored snapshot {summary.get('snapshot_id', '?')[:8]} in {repo.name} ({repo.url}): "
        f"{summary.get('total_files_processed', 0)} files ({summary.get('files_new', 0)} new, "
        f"{summary.get('files_changed', 0)} changed), {summary.get('data_added', 0)} bytes added of "
        f"{summary.get('total_bytes_processed', 0)} processed, from ZFS snapshot @{snap}"
    )
    keep = cfg["forget"]
    if keep:
        repo.restic("forget", "--prune", "--host", cfg["host"], "--tag", "sovereign", *keep, timeout=None)
    count = len(json.loads(repo.restic("snapshots", "--json", "--no-lock", "--host", cfg["host"]).stdout or "[]"))
    METRICS.add("snapshots", count, repository=repo.name)
    say(f"repository {repo.name}: {count} snapshots of {cfg['host']} after forget --prune ({' '.join(keep)})")


def prune_zfs(cfg):
    keep = int(cfg.get("zfs_keep", 2))
    for dataset in cfg["datasets"]:
        names = snapshots_of(dataset, cfg["snapshot_prefix"])
        for old in names[:-keep] if keep > 0 else names:
            zfs("destroy", f"{dataset}@{old}", check=False)


def state_file(cfg, repo, kind):
    return os.path.join(cfg["work_dir"], f"{kind}-{repo.name}.state")


def cmd_check(cfg, args):
    subsets = max(1, int(cfg.get("check_subsets", 1)))
    failed = []
    for repo in repos(cfg, args.repository):
        repo.probe()
        repo.remove_stale_locks()
        path = state_file(cfg, repo, "check")
        try:
            with open(path, encoding="utf-8") as fh:
                last = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            last = 0
        part = 1 if args.all else (last % subsets) + 1
        read = ["--read-data"] if args.all or subsets == 1 else [f"--read-data-subset={part}/{subsets}"]
        res = repo.restic("check", *read, check=False)
        ok = res.returncode == 0
        METRICS.add("check_success", 1 if ok else 0, repository=repo.name)
        METRICS.add("check_subset", 0 if args.all else part, repository=repo.name)
        METRICS.add("check_subsets", subsets, repository=repo.name)
        if not args.all:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(f"{part}\n")
        what = "all data" if read == ["--read-data"] else f"data subset {part}/{subsets}"
        if ok:
            say(f"repository {repo.name}: check of the structure and {what} passed")
        else:
            lines = [ln for ln in ((res.stdout or "") + (res.stderr or "")).splitlines() if ln.strip()]
            # The damaged packs first (restic names them "pack 1a2b3c4d: ..."), then its last error lines.
            packs = [ln.strip() for ln in lines if ln.lower().lstrip().startswith("pack ")]
            errors = [ln.strip() for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
            failed.append(
                f"repository {repo.name} ({repo.url}): check of {what} FAILED: "
                + " / ".join(packs[:5] + [e for e in errors[-3:] if e not in packs[:5]] or lines[-6:])
            )
    if failed:
        raise Failure("; ".join(failed) + ". See docs/runbooks/backups.md#backupcheckfailed.")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree(root):
    """relative path -> (kind, detail) for every entry under root."""
    entries = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", "")
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = ("file", st.st_size)
            else:
                entries[rel] = ("other", stat.S_IFMT(st.st_mode))
    return entries


def compare_trees(source, restored, label):
    """Every file's checksum; returns (files, bytes, [differences])."""
    src, dst = tree(source), tree(restored)
    diffs, files, nbytes = [], 0, 0
    for rel in sorted(set(src) | set(dst)):
        if rel not in dst:
            diffs.append(f"{label}/{rel}: missing from the restore")
            continue
        if rel not in src:
            diffs.append(f"{label}/{rel}: in the restore but not in the ZFS snapshot")
            continue
        if src[rel][0] != dst[rel][0]:
            diffs.append(f"{label}/{rel}: a {src[rel][0]} in the snapshot, a {dst[rel][0]} restored")
            continue
        if src[rel][0] == "link" and src[rel] != dst[rel]:
            diffs.append(f"{label}/{rel}: symlink to {src[rel][1]} restored as one to {dst[rel][1]}")
        if src[rel][0] == "file":
            files += 1
            nbytes += src[rel][1]
            if src[rel][1] != dst[rel][1]:
                diffs.append(f"{label}/{rel}: {src[rel][1]} bytes in the snapshot, {dst[rel][1]} restored")
            elif sha256(os.path.join(source, rel)) != sha256(os.path.join(restored, rel)):
                diffs.append(f"{label}/{rel}: content differs (sha256) from the ZFS snapshot")
    return files, nbytes, diffs


def newest_snapshot(cfg, repo):
    snaps = json.loads(
        repo.restic("snapshots", "--json", "--no-lock", "--host", cfg["host"], "--tag", "sovereign").stdout or "[]"
    )
    if not snaps:
        raise Failure(f"repository {repo.name} holds no snapshot of {cfg['host']}: run playbooks/backup.yml first")
    return sorted(snaps, key=lambda s: s["time"])[-1]


def cmd_drill(cfg, args):
    started = time.monotonic()
    repo = repos(cfg, args.repository or cfg["drill_repository"])[0]
    repo.probe()
    repo.remove_stale_locks()
    snap = newest_snapshot(cfg, repo)
    zfs_snap = next((t[4:] for t in snap.get("tags", []) if t.startswith("zfs:")), "")
    scratch = os.path.join(cfg["work_dir"], "drill")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch, mode=0o700)
    diffs, files, nbytes, tables, cloned = [], 0, 0, 0, []
    try:
        res = repo.restic("restore", snap["id"], "--target", scratch, check=False)
        if res.returncode != 0:
            lines = [ln.strip() for ln in (res.stderr or "").splitlines() if ln.strip()]
            # restic names each file it could not restore ("ignoring error for /path: ..."): those first.
            errors = [ln for ln in lines if "error" in ln.lower()]
            diffs.append(
                f"restic restore of snapshot {snap['short_id']} failed (rc {res.returncode}): "
                + " / ".join((errors or lines)[-6:])
            )
        staged = os.path.join(scratch, cfg["staging_dir"].lstrip("/"))
        try:
            with open(os.path.join(staged, "manifest.json"), encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, ValueError) as exc:
            manifest = {"datasets": {}, "databases": {}}
            diffs.append(f"the snapshot's manifest.json could not be read from the restore: {exc}")
        for dataset, path in sorted(manifest["datasets"].items()):
            if zfs("list", "-H", "-o", "name", f"{dataset}@{zfs_snap}", check=False).returncode != 0:
                diffs.append(
                    f"ZFS snapshot {dataset}@{zfs_snap} (the source of restic snapshot {snap['short_id']}) "
                    "no longer exists to compare with"
                )
                continue
            cloned.append(dataset)
            source = mount_snapshot(cfg, dataset, zfs_snap, "drill")
            f, b, d = compare_trees(source, os.path.join(scratch, path.lstrip("/")), dataset)
            files, nbytes = files + f, nbytes + b
            diffs.extend(d)
        for db in sorted(manifest["databases"]):
            t, d = drill_database(cfg, db, staged)
            tables += t
            diffs.extend(d)
    finally:
        record_clones(cfg, cloned, "drill")
        shutil.rmtree(scratch, ignore_errors=True)
    took = time.monotonic() - started
    for name, value in (
        ("files_compared", files),
        ("bytes_compared", nbytes),
        ("tables_compared", tables),
        ("differences", len(diffs)),
        ("success", 0 if diffs else 1),
        ("seconds", took),
    ):
        METRICS.add(f"drill_{name}", value, repository=repo.name)
    head = (
        f"restore drill of snapshot {snap['short_id']} ({snap['time'][:19]}Z, ZFS @{zfs_snap}) from {repo.name}: "
        f"{files} files / {nbytes} bytes compared by sha256, {tables} tables compared by row count, in {took:.1f} s"
    )
    if diffs:
        for line in diffs[:50]:
            warn(f"DIFFERS: {line}")
        raise Failure(f"{head}: FAILED, {len(diffs)} differences; first: {diffs[0]}")
    say(f"{head}: PASSED, every byte and every row count matches")


def drill_database(cfg, db, staged):
    dump = os.path.join(staged, "postgresql", f"{db}.dump")
    diffs = []
    try:
        with open(os.path.join(staged, "postgresql", f"{db}.rowcounts.json"), encoding="utf-8") as fh:
            expected = json.load(fh)
    except (OSError, ValueError) as exc:
        return 0, [f"database {db}: the row counts taken with the dump are missing from the restore ({exc})"]
    if not os.path.isfile(dump):
        return 0, [f"database {db}: its dump {os.path.basename(dump)} is missing from the restore"]
    scratch = f"sovereign_drill_{db}"
    run(["runuser", "-u", "postgres", "--", "dropdb", "--if-exists", scratch])
    run(["runuser", "-u", "postgres", "--", "createdb", scratch])
    try:
        with open(dump, "rb") as fh:
            res = subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    "pg_restore",
                    "--no-owner",
                    "--no-acl",
                    "--exit-on-error",
                    "-d",
                    scratch,
                ],
                stdin=fh,
                capture_output=True,
                check=False,
            )
        if res.returncode != 0:
            return 0, [
                f"database {db}: pg_restore of the dump into {scratch} failed: "
                + (" / ".join(res.stderr.decode(errors="replace").strip().splitlines()[-3:]) or "no output")
            ]
        got = parse_counts(psql(scratch, COUNT_SQL))
    finally:
        run(["runuser", "-u", "postgres", "--", "dropdb", "--if-exists", scratch], check=False)
    for table in sorted(set(expected) | set(got)):
        if expected.get(table) != got.get(table):
            diffs.append(
                f"database {db}, table {table}: {expected.get(table)} rows at the dump, {got.get(table)} restored"
            )
    return len(expected), diffs


def cmd_restore(cfg, args):
    """Restore one dataset's tree (and optionally one database) from a repository into place."""
    repo = repos(cfg, args.repository or cfg["drill_repository"])[0]
    repo.probe()
    repo.remove_stale_locks()
    snap_id = args.snapshot or newest_snapshot(cfg, repo)["id"]
    scratch = os.path.join(cfg["work_dir"], "restore")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch, mode=0o700)
    try:
        includes = []
        if args.dataset:
            includes.append(mount_path(cfg, args.dataset))
        if args.database:
            includes.append(os.path.join(cfg["staging_dir"], "postgresql", f"{args.database}.dump"))
        repo.restic("restore", snap_id, "--target", scratch, *[a for p in includes for a in ("--include", p)])
        if args.dataset:
            src = os.path.join(scratch, mount_path(cfg, args.dataset).lstrip("/"))
            if not os.path.isdir(src):
                raise Failure(f"snapshot {snap_id} holds no data of dataset {args.dataset}")
            run(["rsync", "-aHAX", "--numeric-ids", "--delete", src + "/", args.into.rstrip("/") + "/"])
            say(f"restored dataset {args.dataset} from {repo.name} snapshot {snap_id[:8]} into {args.into}")
        if args.database:
            dump = os.path.join(scratch, cfg["staging_dir"].lstrip("/"), "postgresql", f"{args.database}.dump")
            run(["runuser", "-u", "postgres", "--", "dropdb", "--if-exists", "--force", args.database])
            with open(dump, "rb") as fh:
                res = subprocess.run(
                    ["runuser", "-u", "postgres", "--", "pg_restore", "--create", "--exit-on-error", "-d", "postgres"],
                    stdin=fh,
                    capture_output=True,
                    check=False,
                )
            if res.returncode != 0:
                raise Failure(
                    f"pg_restore of {args.database} failed: {res.stderr.decode(errors='replace').strip()[-400:]}"
                )
            say(f"restored database {args.database} from {repo.name} snapshot {snap_id[:8]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cmd_restic(cfg, args):
    repo = repos(cfg, args.repo)[0]
    repo.probe()
    res = repo.restic(*args.args, check=False, capture=False)
    return res.returncode


def main(argv=None):
    p = argparse.ArgumentParser(prog="sovereign-restic", description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default=CONFIG)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("init", "backup", "check", "drill", "restore"):
        s = sub.add_parser(name)
        s.add_argument("--repository", default="", help="only this repository (default: all; drill: the drill one)")
        if name == "check":
            s.add_argument("--all", action="store_true", help="read all data, not the next subset")
        if name == "restore":
            s.add_argument("--snapshot", default="")
            s.add_argument("--dataset", default="")
            s.add_argument("--into", default="")
            s.add_argument("--database", default="")
    s = sub.add_parser("restic")
    s.add_argument("repo")
    s.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        warn(f"cannot read {args.config}: {exc}; converge the restic_backup role")
        return 2
    if args.command == "restore" and args.dataset and not args.into:
        p.error("restore --dataset needs --into DIR (the dataset's live mountpoint)")
    try:
        rc = {
            "init": cmd_init,
            "backup": cmd_backup,
            "check": cmd_check,
            "drill": cmd_drill,
            "restore": cmd_restore,
            "restic": cmd_restic,
        }[args.command](cfg, args)
    except Failure as exc:
        warn(str(exc))
        return 1
    except subprocess.TimeoutExpired as exc:
        warn(f"{' '.join(exc.cmd[:3])} ... did not finish within {exc.timeout} s")
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
