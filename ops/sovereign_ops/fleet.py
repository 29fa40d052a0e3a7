"""What sovereign-ops reads from the hosts, and how it merges and shows it (pure functions, unit-tested)."""

from __future__ import annotations

import json
import shlex

# Run on each host as `python3 -c SNIPPET` (read-only): prints one JSON object.
STATUS_SNIPPET = r"""
import json, os, socket, urllib.request
CONFIG = "/etc/sovereign/runtime"
MAP = "/etc/haproxy/sovereign/live.map"
SOCK = "/run/haproxy/admin.sock"
PORTS = {"blue": 8001, "green": 8002}
out = {"hostname": socket.gethostname(), "live_file": None, "live_haproxy": None, "colors": {}}
try:
    for line in open(MAP, encoding="utf-8"):
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "live":
            out["live_file"] = parts[1]
except OSError as exc:
    out["map_error"] = str(exc)
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(SOCK)
    s.sendall(("show map " + MAP + "\n").encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "live":
            out["live_haproxy"] = parts[2]
except OSError as exc:
    out["haproxy_error"] = str(exc)
for color, port in PORTS.items():
    info = {"model": None, "version": None, "uri": None, "ready": False, "health": None}
    try:
        for line in open(os.path.join(CONFIG, color + ".model.env"), encoding="utf-8"):
            key, _, value = line.strip().partition("=")
            if key == "SOVEREIGN_RUNTIME_MODEL_NAME":
                info["model"] = value
            elif key == "SOVEREIGN_RUNTIME_MODEL_VERSION":
                info["version"] = value
            elif key == "SOVEREIGN_RUNTIME_MODEL_URI":
                info["uri"] = value
    except OSError:
        pass
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/v2/health/ready" % port, timeout=2) as r:
            info["ready"] = r.status == 200
            info["health"] = "ready"
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        info["health"] = body.get("state") or ("HTTP %d" % exc.code)
        if body.get("reason"):
            info["health"] += ": " + str(body["reason"])[:80]
    except OSError as exc:
        info["health"] = "down (%s)" % getattr(exc, "reason", exc)
    out["colors"][color] = info
print(json.dumps(out))
"""

LEDGER = "/var/lib/sovereign/deployments.jsonl"


def status_command():
    """The shell command that runs STATUS_SNIPPET on a host. The snippet goes on the command line, not on
    stdin: Fabric (invoke) feeds an in_stream to the remote one byte per 10 ms poll, ~25 s for this snippet."""
    return "python3 -c " + shlex.quote(STATUS_SNIPPET)


def parse_status(host, rc, stdout, stderr=""):
    """One row of `status` from the snippet's output (or the failure to run it)."""
    row = dict(host=host, ok=False, error=None, live=None, colors={})
    if rc != 0:
        text = (stderr or stdout or "").strip()
        row["error"] = text.splitlines()[-1][:200] if text else f"exit {rc}"
        return row
    try:
        data = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row["error"] = f"unreadable answer: {stdout.strip()[:120]!r}"
        return row
    live_file, live_haproxy = data.get("live_file"), data.get("live_haproxy")
    row["live"] = live_haproxy or live_file
    row["colors"] = data.get("colors") or {}
    problems = []
    if live_haproxy and live_file and live_haproxy != live_file:
        problems.append(f"HAProxy routes to {live_haproxy} but the map file says {live_file}")
    if not row["live"]:
        problems.append("no live color (" + (data.get("map_error") or "map entry missing") + ")")
    elif not (row["colors"].get(row["live"]) or {}).get("ready"):
        problems.append(f"live color {row['live']} is not ready")
    row["error"] = "; ".join(problems) or None
    row["ok"] = not problems
    return row


def format_status(rows):
    lines = [f"{'HOST':<20} {'LIVE':<6} {'BLUE':<28} {'GREEN':<28} STATE"]
    for row in rows:
        cells = []
        for color in ("blue", "green"):
            info = row["colors"].get(color) or {}
            if not info:
                cells.append("-")
                continue
            model = f"{info['model']} v{info.get('version') or '?'}" if info.get("model") else "no model"
            health = "ready" if info.get("ready") else (info.get("health") or "down").split(" (")[0].split(":")[0]
            cells.append(f"{model} ({health})"[:28])
        state = "ok" if row["ok"] else f"PROBLEM: {row['error']}"
        lines.append(f"{row['host']:<20} {row['live'] or '-':<6} {cells[0]:<28} {cells[1]:<28} {state}")
    return "\n".join(lines)


def parse_ledger(host, text):
    """Records of one host's ledger text; unparsable lines skipped; `host` filled in when missing.

    The line format is the collection's (plugins/module_utils/_ledger.py, parse_ledger): this package is installed
    on its own (`pip install ./ops`) and cannot import the collection's private module_utils, so the few lines are
    repeated here on purpose, and tests/unit/ops/test_ledger_format.py proves both parsers agree on a table of
    lines. Change both, or neither."""
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
            record.setdefault("host", host)
            records.append(record)
    return records


def merge_history(ledgers, limit=None):
    """All hosts' records, newest first (by `time`, ISO 8601 UTC; ties keep host order, then file order reversed)."""
    merged = []
    for order, records in enumerate(ledgers.values()):
        for index, record in enumerate(records):
            merged.append((str(record.get("time") or ""), -order, index, record))
    merged.sort(key=lambda item: (item[0], item[1], item[2]), reverse=True)
    out = [item[3] for item in merged]
    return out[:limit] if limit else out


def short_data_rev(record):
    """The DATA cell of `history`: the first 8 characters of the record's data_rev (a git commit), else of its
    data_md5 prefixed `md5:`; `-` when the record names no data version ("" or absent: older records)."""
    rev = str(record.get("data_rev") or "")
    if rev:
        return rev[:8]
    md5 = str(record.get("data_md5") or "")
    return f"md5:{md5[:8]}" if md5 else "-"


def format_history(records):
    lines = [
        f"{'TIME':<21} {'HOST':<16} {'ACTION':<9} {'RESULT':<8} {'COLOR':<14} {'MODEL':<22} {'DATA':<12} "
        f"{'WHO':<20} REASON"
    ]
    for r in records:
        move = f"{r.get('previous_color') or '?'}->{r.get('color') or '?'}"
        model = f"{r.get('model_name') or '?'} v{r.get('model_version') or '?'}"
        cell = {k: str(r.get(k) or "?") for k in ("time", "host", "result", "who")}
        action = str(r.get("action") or "deploy")
        reason = str(r.get("reason") or "")[:100]
        lines.append(
            f"{cell['time']:<21} {cell['host']:<16} {action:<9} {cell['result']:<8} {move:<14} {model:<22} "
            f"{short_data_rev(r):<12} {cell['who']:<20} {reason}"
        )
    return "\n".join(lines)
