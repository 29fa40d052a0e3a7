"""What sovereign-ops reads from the hosts, and how it merges and shows it (pure functions, unit-tested)."""

from __future__ import annotations

import json
import pathlib
import shlex

from . import probe

FACT = probe.FACT


def _command(mode, fact=None):
    """The shell command that runs probe.py (the whole file) on a host in MODE. The source goes on the command
    line, not on stdin: Fabric (invoke) feeds an in_stream to the remote one byte per 10 ms poll (~25 s)."""
    source = pathlib.Path(probe.__file__).read_text(encoding="utf-8")
    return shlex.join(["python3", "-c", source, mode, *([fact] if fact else [])])


def status_command(fact=None):
    return _command("status", fact)


def ledger_command(fact=None):
    return _command("ledger", fact)


def flags_command(fact=None):
    return _command("flags", fact)


def answer(rc, stdout, stderr=""):
    """(probe's JSON answer, None) or (None, one-line error) for one host's run of a probe command."""
    if rc != 0:
        text = (stderr or stdout or "").strip()
        last = text.splitlines()[-1][:200] if text else f"exit {rc}"
        if rc == 127 or "python3: not found" in text or "python3: command not found" in text:
            return None, "python3 not found on the host: install it (Ansible needs it there too)"
        return None, last
    try:
        data = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, f"unreadable answer: {stdout.strip()[:120]!r}"
    if not isinstance(data, dict):
        return None, f"unreadable answer: {stdout.strip()[:120]!r}"
    if data.get("contract_error"):
        return None, (
            f"host contract fact unusable: {data['contract_error']}; re-run the roles that publish it "
            "(playbooks/site.yml) or fix the file"
        )
    return data, None


PUBLISHED_BY = {"release": "the first deploy (playbooks/deploy.yml)"}


def contract_note(host, contract):
    """A one-line note when a host's paths and ports came (partly) from the built-in defaults, else None."""
    if not contract or not contract.get("defaulted"):
        return None
    if contract.get("source") == "defaults":
        what = f"no host contract fact at {contract.get('path') or FACT}"
        fix = "converge playbooks/site.yml to publish the fact"
    else:
        what = f"the host contract fact has no {', '.join(contract['defaulted'])}"
        # The release section appears with the host's first deploy; the others with site.yml.
        publishers = list(
            dict.fromkeys(PUBLISHED_BY.get(d.split(".")[0], "playbooks/site.yml") for d in contract["defaulted"])
        )
        fix = " and ".join(publishers) + (" publishes it" if len(publishers) == 1 else " publish it")
    return f"{host}: {what}; used the built-in defaults for it ({fix})"


def parse_status(host, rc, stdout, stderr=""):
    """One row of `status` from the snippet's output (or the failure to run it)."""
    row = dict(host=host, ok=False, error=None, live=None, colors={}, contract=None, note=None)
    data, error = answer(rc, stdout, stderr)
    if error:
        row["error"] = error
        return row
    row["contract"] = data.get("contract")
    row["note"] = contract_note(host, row["contract"])
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


def ledger_answer(host, rc, stdout, stderr=""):
    """(records, error or None, note or None) of one host's run of ledger_command()."""
    data, error = answer(rc, stdout, stderr)
    if error:
        return [], error, None
    note = contract_note(host, data.get("contract"))
    return parse_ledger(host, data.get("ledger_text") or ""), data.get("ledger_error"), note


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


def parse_flags(host, rc, stdout, stderr=""):
    """One host's answer of `flags`: {host, ok, error, file, flags: {key: {state, default, rollout, ...}}}."""
    row = dict(host=host, ok=False, error=None, file=None, flags={})
    data, error = answer(rc, stdout, stderr)
    if error:
        row["error"] = error
        return row
    row["file"] = data.get("flags_file")
    row["error"] = data.get("flags_error")
    row["flags"] = data.get("flags") or {}
    row["ok"] = row["error"] is None
    return row


def describe_rollout(flag):
    rollout = flag.get("rollout")
    if rollout:
        return f"{rollout['percentage']:g}% {rollout['variant']}, rest {rollout['rest']}"
    return "targeting rules" if flag.get("targeting") else "-"


def format_flags(rows):
    lines = [f"{'HOST':<20} {'FLAG':<28} {'STATE':<9} {'DEFAULT':<10} ROLLOUT"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['host']:<20} {'-':<28} {'-':<9} {'-':<10} PROBLEM: {row['error']}")
            continue
        for key, flag in row["flags"].items():
            state = flag.get("state") or "?"
            default = str(flag.get("default"))
            lines.append(f"{row['host']:<20} {key:<28} {state:<9} {default:<10} {describe_rollout(flag)}")
    return "\n".join(lines)
