"""sovereign-ops flags: the probe's `flags` mode on a real flag file written by the feature_flag module's helpers,
and cli.main end to end (the real ansible-inventory; the probe command run in a local shell in place of SSH)."""

from __future__ import annotations

import json
import subprocess

from sovereign_ops import cli, fleet

FLAG_FILE = {
    "$schema": "https://flagd.dev/schema/v0/flags.json",
    "flags": {
        "runtime-batching": {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off"},
        "new-ranking": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "off",
            "targeting": {"fractional": [{"var": "targetingKey"}, ["on", 25], ["off", 75]]},
        },
        "greeting": {
            "state": "DISABLED",
            "variants": {"a": "hi", "b": "hello"},
            "defaultVariant": "a",
            "targeting": {"if": [{"==": [{"var": "color"}, "green"]}, "b", None]},
        },
    },
}


def run(command):
    return subprocess.run(["sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def host_files(tmp_path, flags=FLAG_FILE):
    path = tmp_path / "flags" / "flags.json"
    path.parent.mkdir()
    if flags is not None:
        path.write_text(flags if isinstance(flags, str) else json.dumps(flags))
    fact = tmp_path / "sovereign.fact"
    fact.write_text(json.dumps({"feature_flags": {"file": str(path), "group": "sovereign"}}))
    return fact, path


def test_probe_reads_the_file_the_contract_names(tmp_path):
    fact, path = host_files(tmp_path)
    proc = run(fleet.flags_command(str(fact)))
    row = fleet.parse_flags("h1", proc.returncode, proc.stdout, proc.stderr)
    assert row["ok"] and row["file"] == str(path)
    assert row["flags"]["new-ranking"]["rollout"] == {"variant": "on", "percentage": 25.0, "rest": "off"}
    assert row["flags"]["runtime-batching"] == {
        "state": "ENABLED", "default": "off", "variants": ["off", "on"], "rollout": None, "targeting": False,
    }  # fmt: skip
    table = fleet.format_flags([row]).splitlines()
    assert table[1].split()[:4] == ["h1", "greeting", "DISABLED", "a"] and table[1].endswith("targeting rules")
    assert table[2].split()[:4] == ["h1", "new-ranking", "ENABLED", "off"] and table[2].endswith("25% on, rest off")
    assert table[3].endswith(" -")


def test_a_missing_or_broken_file_is_a_problem_row(tmp_path):
    fact, path = host_files(tmp_path, flags=None)
    proc = run(fleet.flags_command(str(fact)))
    row = fleet.parse_flags("h1", proc.returncode, proc.stdout, proc.stderr)
    assert not row["ok"] and "no flag file (roles/feature_flags writes it)" in row["error"]
    path.write_text("{broken")
    proc = run(fleet.flags_command(str(fact)))
    row = fleet.parse_flags("h1", proc.returncode, proc.stdout, proc.stderr)
    assert not row["ok"] and str(path) in row["error"]
    assert "PROBLEM: " in fleet.format_flags([row])


def test_cli_flags_end_to_end(tmp_path, monkeypatch, capsys):
    fact, _path = host_files(tmp_path)
    inv = tmp_path / "hosts.ini"
    inv.write_text("[inference]\nlocal-01 ansible_host=127.0.0.1\n")

    def local(h, command, timeout=30):
        proc = run(command)
        return proc.returncode, proc.stdout, proc.stderr

    monkeypatch.setattr(cli, "run_on", local)
    assert cli.main(["-i", str(inv), "--fact", str(fact), "flags", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["host"] == "local-01" and sorted(row["flags"]) == ["greeting", "new-ranking", "runtime-batching"]
    assert cli.main(["-i", str(inv), "--fact", str(tmp_path / "none.fact"), "flags"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: /etc/sovereign/flags/flags.json: " in out
