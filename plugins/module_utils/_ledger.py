# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Deployment ledger, fleet deploy lock and deploy metrics of one inference host.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

* The ledger is a JSON-lines file, one record per release operation (deploy, rollback), appended under an
  ``flock`` and fsync'd. Readers skip lines they cannot parse (a torn last line after a crash).
* The fleet lock is a directory created with ``mkdir`` (atomic on POSIX, as kamal does) holding ``info.json``
  (holder, since, ttl, token). It outlives the process that took it; its TTL is what frees it after a killed run.
* The metrics are rebuilt from the host's actual state (map file, model env files) and the ledger, so they
  never drift from what the host serves.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid

COLORS = ("blue", "green")
LOCK_INFO = "info.json"


# -- time -------------------------------------------------------------------------------------------------------


def iso_from_epoch(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


def epoch_from_iso(text):
    """Seconds since the epoch for ``YYYY-MM-DDTHH:MM:SSZ`` (fractional seconds tolerated); None when unparsable."""
    if not isinstance(text, str) or not text:
        return None
    base = text.rstrip("Z").split(".")[0].split("+")[0]
    try:
        return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


# -- small parsers ------------------------------------------------------------------------------------------------


def parse_env(text):
    """KEY=VALUE lines of a systemd EnvironmentFile (comments, blanks and surrounding quotes handled)."""
    out = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def map_value(text, key):
    """Value of ``key`` in an HAProxy map file's text (last occurrence wins, as HAProxy's loader does)."""
    found = None
    for line in (text or "").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == key:
            found = parts[1]
    return found


def read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


# -- ledger ------------------------------------------------------------------------------------------------------


# The ledger's line format, shared by contract (not by import) with ops/sovereign_ops/fleet.py, which parses the
# same text on the controller: one JSON object per line; blank, unparsable (a torn last line) or non-object lines
# are skipped. tests/unit/ops/test_ledger_format.py proves both parsers agree on a table of lines.
# The lineage fields of a record: the data version that trained the model (the registry version's ``data.rev``
# and ``data.md5`` tags, else its run's) and the MLflow run; "" when unknown (a model trained without DVC).
LINEAGE_FIELDS = ("data_rev", "data_md5", "run_id")


def parse_ledger(text):
    """Records of a ledger's text, in file order; unparsable or non-object lines are skipped."""
    records = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_ledger(path):
    return parse_ledger(read_text(path))


def append_record(path, record):
    """Append one record (one line, sorted keys) under an exclusive flock, fsync'd. Creates the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, 0o755, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line leaves no newline: start ours on a line of its own.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return line.strip()


def last_record(records, **match):
    """The newest record whose fields equal every ``match`` item (None when there is none)."""
    for record in reversed(records):
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def model_lineage(records, model):
    """{data_rev, data_md5, run_id} of a color's configured ``model`` ({uri, version}, from its model.env), from
    the newest record of that very model (same model_uri and model_version, any action or result: the data version
    belongs to the model, not to the outcome) that carries lineage fields; "" for each when no record does (a
    model deployed before the ledger recorded data versions, or installed by hand)."""
    empty = dict.fromkeys(LINEAGE_FIELDS, "")
    if not model or not model.get("uri"):
        return empty
    for record in reversed(records):
        if (
            "data_rev" in record
            and str(record.get("model_uri") or "") == model["uri"]
            and str(record.get("model_version") or "") == str(model.get("version") or "")
        ):
            return {key: str(record.get(key) or "") for key in LINEAGE_FIELDS}
    return empty


# -- host state and metrics ----------------------------------------------------------------------------------------


def color_models(config_dir, colors=COLORS):
    """{color: {uri, name, version}} from ``<config_dir>/<color>.model.env`` (None for a color without one)."""
    out = {}
    for color in colors:
        text = read_text(os.path.join(config_dir, f"{color}.model.env"))
        if text is None:
            out[color] = None
            continue
        env = parse_env(text)
        uri = env.get("SOVEREIGN_RUNTIME_MODEL_URI", "")
        out[color] = dict(
            uri=uri,
            name=env.get("SOVEREIGN_RUNTIME_MODEL_NAME", ""),
            version=env.get("SOVEREIGN_RUNTIME_MODEL_VERSION", ""),
            golden_file=golden_file(uri, env.get("SOVEREIGN_RUNTIME_GOLDEN_FILE", "")),
        )
    return out


def golden_file(uri, explicit=""):
    """The golden file the runtime uses for a local model (its documented search order), or None.
    Registry models (models:/...) keep theirs inside the artifact: None."""
    candidates = [explicit] if explicit else []
    if uri.startswith("/"):
        candidates += [
            uri + ".golden.json",
            os.path.join(uri, "golden.json"),
            os.path.join(uri, "extra_files", "golden.json"),
        ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def read_golden(path, limit=1 << 20):
    """The golden example in PATH (a dict), or None when it is missing, too large or not a JSON object."""
    try:
        if not path or os.path.getsize(path) > limit:
            return None
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def metrics_registry(live_color, models, records, colors=COLORS):
    """A prometheus_client registry with the sovereign_deploy_* families (imported lazily: hosts need it)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    live = Gauge(
        "sovereign_deploy_live_color", "1 for the color the traffic switch routes to", ["color"], registry=registry
    )
    info = Gauge(
        "sovereign_deploy_model_info",
        "The model each color is configured to serve (value 1)",
        ["color", "model", "version"],
        registry=registry,
    )
    last_time = Gauge(
        "sovereign_deploy_last_timestamp_seconds",
        "When the last release operation on this host ended, by action",
        ["action"],
        registry=registry,
    )
    last_ok = Gauge(
        "sovereign_deploy_last_success",
        "1 when the last release operation of this action succeeded, 0 when it failed",
        ["action"],
        registry=registry,
    )
    # A separate family, not labels on model_info: its series stay as they were, and this one has at most one
    # series per color (the data version changes only with the model).
    data_info = Gauge(
        "sovereign_deploy_model_data_info",
        "The data version (DVC data.rev, data.md5) that trained each color's model, from the ledger (value 1)",
        ["color", "data_rev", "data_md5"],
        registry=registry,
    )
    total = Gauge(
        "sovereign_deploy_operations",
        "Release operations recorded in this host's ledger, by action and result",
        ["action", "result"],
        registry=registry,
    )
    for color in colors:
        live.labels(color=color).set(1 if color == live_color else 0)
        model = models.get(color)
        if model:
            info.labels(color=color, model=model["name"] or "", version=model["version"] or "").set(1)
            lineage = model_lineage(records, model)
            if lineage["data_rev"] or lineage["data_md5"]:
                data_info.labels(color=color, data_rev=lineage["data_rev"], data_md5=lineage["data_md5"]).set(1)
    counts = {}
    for record in records:
        action = str(record.get("action") or "deploy")
        result = str(record.get("result") or "unknown")
        counts[(action, result)] = counts.get((action, result), 0) + 1
    for (action, result), count in sorted(counts.items()):
        total.labels(action=action, result=result).set(count)
    for action in sorted({a for a, _dummy in counts}):
        record = next((r for r in reversed(records) if str(r.get("action") or "deploy") == action), None)
        epoch = epoch_from_iso(record.get("time")) if record else None
        if epoch is not None:
            last_time.labels(action=action).set(epoch)
        last_ok.labels(action=action).set(1 if record and record.get("result") == "success" else 0)
    return registry


def write_metrics(path, registry, mode=0o644):
    """Atomic write (temporary file in the same directory, then rename) via prometheus_client."""
    from prometheus_client import write_to_textfile

    os.makedirs(os.path.dirname(os.path.abspath(path)), 0o755, exist_ok=True)
    write_to_textfile(path, registry)
    os.chmod(path, mode)


# -- fleet lock ----------------------------------------------------------------------------------------------------


class LockHeld(Exception):
    def __init__(self, info, age):
        self.info = info
        self.age = age
        super().__init__(describe_holder(info, age))


def describe_holder(info, age=None):
    holder = info.get("holder") or "an unknown holder"
    since = info.get("since") or "an unknown time"
    text = f"{holder} since {since}"
    if age is not None:
        text += f" ({int(age)}s ago, TTL {info.get('ttl', '?')}s)"
    if info.get("note"):
        text += ": " + str(info["note"])
    return text


def read_lock(path):
    """The lock's info (dict) or None when there is no lock. A lock directory without a readable info.json (a run
    killed between mkdir and write, or one writing it right now) gets holder 'unknown', its since from the
    directory's mtime and a 60 s TTL."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    text = read_text(os.path.join(path, LOCK_INFO))
    info = None
    if text:
        with contextlib.suppress(ValueError):
            info = json.loads(text)
    if not isinstance(info, dict):
        info = dict(holder="unknown (lock without info.json)", since=iso_from_epoch(stat.st_mtime), ttl=60)
    if epoch_from_iso(info.get("since")) is None:
        info["since"] = iso_from_epoch(stat.st_mtime)
    return info


def lock_age(info, now=None):
    now = time.time() if now is None else now
    since = epoch_from_iso(info.get("since"))
    return max(0.0, now - since) if since is not None else float("inf")


def is_stale(info, now=None):
    try:
        ttl = float(info.get("ttl") or 0)
    except (TypeError, ValueError):
        ttl = 0.0
    return lock_age(info, now) > ttl


def try_mkdir_lock(path, holder, ttl, note="", token=None, now=None):
    """Create the lock directory atomically; returns its info, or None when it already exists."""
    now = time.time() if now is None else now
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, 0o755, exist_ok=True)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return None
    info = dict(
        holder=holder,
        since=iso_from_epoch(now),
        ttl=int(ttl),
        token=token or uuid.uuid4().hex,
        note=note or "",
        pid=os.getpid(),
    )
    tmp = os.path.join(path, LOCK_INFO + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(info, handle, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(path, LOCK_INFO))
    return info


def remove_lock(path):
    """Remove the lock directory: rename first (atomic, so a concurrent taker never sees a half-removed lock)."""
    graveyard = f"{path}.removed-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, graveyard)
    except FileNotFoundError:
        return False
    shutil.rmtree(graveyard, ignore_errors=True)
    return True
