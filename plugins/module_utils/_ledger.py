# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Deployment ledger of one inference host, and the model (with its lineage) each color is configured with.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

The ledger is a JSON-lines file, one record per release operation (deploy, rollback), appended under an
``flock`` and fsync'd. Readers skip lines they cannot parse (a torn last line after a crash). Metrics built from
it are in ``_deploy_metrics``; the fleet deploy lock in ``_fleet_lock``.
"""

from __future__ import annotations

import calendar
import json
import os
import time

from ansible_collections.sovereign.mlops.plugins.module_utils._files import lock_fd, parse_env, read_text

COLORS = ("blue", "green")


# -- time -------------------------------------------------------------------------------------------------------


def iso_from_epoch(epoch):
    """``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds): the time format of ledger records and lock files."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


def utc_now_iso():
    """Now, as :func:`iso_from_epoch` writes it."""
    return iso_from_epoch(time.time())


def epoch_from_iso(text):
    """Seconds since the epoch for ``YYYY-MM-DDTHH:MM:SSZ`` (fractional seconds tolerated); None when unparsable."""
    if not isinstance(text, str) or not text:
        return None
    base = text.rstrip("Z").split(".")[0].split("+")[0]
    try:
        return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
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
        lock_fd(fd, path=path)
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


# -- the model of each color ----------------------------------------------------------------------------------------


def model_env_path(config_dir, color):
    """Where the runtime reads the model of ``color`` (the inference_runtime role's layout)."""
    return os.path.join(config_dir, f"{color}.model.env")


def color_models(config_dir, colors=COLORS, paths=None):
    """{color: {uri, name, version, golden_file}} from each color's model env file (None for a color without one):
    ``paths[color]`` when given (the host contract's ``runtime.colors.<color>.model_env``), else
    ``<config_dir>/<color>.model.env``."""
    out = {}
    for color in colors:
        path = (paths or {}).get(color) or model_env_path(config_dir, color)
        text = read_text(path)
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
