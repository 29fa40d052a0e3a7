# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""host_contract on real files in tmp_path, driven by tables: publish, replace, metrics ownership, check mode,
diff, bad input (nothing changed) and a bad file on disk. The file is read back the way Ansible's setup reads a
.fact file (json.loads of a non-executable file)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _host_contract
from ansible_collections.sovereign.mlops.plugins.modules import host_contract
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import run_module

SWITCH = dict(
    frontend=dict(address="0.0.0.0", port=8000, url="http://127.0.0.1:8000"),
    map_file="/etc/haproxy/sovereign/live.map",
    map_key="live",
    admin_socket="/run/haproxy/admin.sock",
    stats=dict(address="127.0.0.1", port=8404),
)
RUNTIME = dict(config_dir="/etc/sovereign/runtime", colors=dict(blue=dict(host="127.0.0.1", port=8001)))
HAPROXY = dict(address="127.0.0.1", port=8404)
HAPROXY_FULL = dict(
    job="haproxy",
    address="127.0.0.1",
    port=8404,
    path="/metrics",
    scheme="http",
    auth=False,
    labels={},
    published_by="traffic_switch",
)
NODE = dict(address="10.0.0.5", port=9100, labels=dict(role="base"))


def _run(capsys, path, check_mode=False, diff=False, **args):
    return run_module(host_contract.main, dict(args, path=str(path)), capsys, check_mode=check_mode, diff=diff)


def _read(path):
    """As Ansible's setup does for a non-executable .fact file."""
    assert not os.access(path, os.X_OK)
    return json.loads(path.read_text())


# (id, existing contract or None, args, expected contract after)
PUBLISH = [
    (
        "first-section-creates-the-file",
        None,
        dict(section="traffic_switch", data=SWITCH, metrics=dict(haproxy=HAPROXY)),
        dict(version=1, traffic_switch=SWITCH, metrics=dict(haproxy=HAPROXY_FULL)),
    ),
    (
        "second-section-keeps-the-first",
        dict(version=1, traffic_switch=SWITCH, metrics=dict(haproxy=HAPROXY_FULL)),
        dict(section="runtime", data=RUNTIME),
        dict(version=1, traffic_switch=SWITCH, runtime=RUNTIME, metrics=dict(haproxy=HAPROXY_FULL)),
    ),
    (
        "data-replaces-the-section-wholly",
        dict(version=1, runtime=dict(RUNTIME, stale_key="x")),
        dict(section="runtime", data=RUNTIME),
        dict(version=1, runtime=RUNTIME),
    ),
    (
        "metrics-replace-only-that-sections-endpoints",
        dict(
            version=1,
            metrics=dict(
                haproxy=HAPROXY_FULL,
                old_switch_job=dict(HAPROXY_FULL, job="old"),
                node_exporter=dict(HAPROXY_FULL, published_by="common"),
            ),
        ),
        dict(section="traffic_switch", metrics=dict(haproxy=dict(HAPROXY, port=8405))),
        dict(
            version=1,
            metrics=dict(
                haproxy=dict(HAPROXY_FULL, port=8405), node_exporter=dict(HAPROXY_FULL, published_by="common")
            ),
        ),
    ),
    (
        "metrics-only-no-section-data",
        None,
        dict(section="common", metrics=dict(node_exporter=NODE)),
        dict(
            version=1,
            metrics=dict(
                node_exporter=dict(
                    job="node_exporter",
                    address="10.0.0.5",
                    port=9100,
                    path="/metrics",
                    scheme="http",
                    auth=False,
                    labels=dict(role="base"),
                    published_by="common",
                )
            ),
        ),
    ),
    (
        "empty-metrics-remove-them",
        dict(version=1, metrics=dict(haproxy=HAPROXY_FULL)),
        dict(section="traffic_switch", metrics={}),
        dict(version=1, metrics={}),
    ),
    (
        "absent-removes-section-and-its-metrics",
        dict(version=1, traffic_switch=SWITCH, runtime=RUNTIME, metrics=dict(haproxy=HAPROXY_FULL)),
        dict(section="traffic_switch", state="absent"),
        dict(version=1, runtime=RUNTIME, metrics={}),
    ),
    (
        "job-scheme-auth-path-given",
        None,
        dict(
            section="runtime",
            metrics=dict(
                runtime_blue=dict(
                    job="sovereign_runtime",
                    address="10.0.0.5",
                    port="8001",
                    path="/metrics",
                    scheme="https",
                    auth=True,
                    labels=dict(color="blue"),
                )
            ),
        ),
        dict(
            version=1,
            metrics=dict(
                runtime_blue=dict(
                    job="sovereign_runtime",
                    address="10.0.0.5",
                    port=8001,
                    path="/metrics",
                    scheme="https",
                    auth=True,
                    labels=dict(color="blue"),
                    published_by="runtime",
                )
            ),
        ),
    ),
]


@pytest.mark.parametrize(("before", "args", "expected"), [c[1:] for c in PUBLISH], ids=[c[0] for c in PUBLISH])
def test_publish(tmp_path, capsys, before, args, expected):
    path = tmp_path / "facts.d" / "sovereign.fact"
    if before is not None:
        path.parent.mkdir()
        path.write_text(json.dumps(before))
    result = _run(capsys, path, **args)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert result["contract"] == expected
    assert _read(path) == expected
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(path.parent)) == ["sovereign.fact"]  # no temporary file left
    again = _run(capsys, path, **args)
    assert again["changed"] is False, "publishing the same again must change nothing"
    assert again["contract"] == expected


@pytest.mark.parametrize(("before", "args", "expected"), [c[1:] for c in PUBLISH], ids=[c[0] for c in PUBLISH])
def test_check_mode_and_diff_are_honest(tmp_path, capsys, before, args, expected):
    path = tmp_path / "sovereign.fact"
    text = None if before is None else json.dumps(before)
    if text is not None:
        path.write_text(text)
    result = _run(capsys, path, check_mode=True, diff=True, **args)
    assert result["changed"] is True
    assert result["contract"] == expected
    assert json.loads(result["diff"]["after"]) == expected
    assert result["diff"]["before"] == (text or "")
    # Nothing written in check mode.
    assert (path.read_text() if path.exists() else None) == text
    # What check mode predicted is what a real run writes.
    real = _run(capsys, path, diff=True, **args)
    assert real["diff"]["after"] == result["diff"]["after"] == path.read_text()


def test_unchanged_has_no_diff(tmp_path, capsys):
    path = tmp_path / "sovereign.fact"
    _run(capsys, path, section="runtime", data=RUNTIME)
    result = _run(capsys, path, check_mode=True, diff=True, section="runtime", data=RUNTIME)
    assert result["changed"] is False
    assert "diff" not in result


def test_an_executable_fact_file_is_rewritten_0644(tmp_path, capsys):
    path = tmp_path / "sovereign.fact"
    _run(capsys, path, section="runtime", data=RUNTIME)
    os.chmod(path, 0o755)
    assert _run(capsys, path, section="runtime", data=RUNTIME)["changed"] is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# (id, args, existing text or None, message fragment)
BAD = [
    ("section-reserved-metrics", dict(section="metrics", data={}), None, "section must be"),
    ("section-reserved-version", dict(section="version", data={}), None, "section must be"),
    ("section-not-identifier", dict(section="Traffic-Switch", data={}), None, "section must be"),
    ("endpoint-without-port", dict(section="x", metrics=dict(a=dict(address="h"))), None, "metrics.a.port"),
    ("endpoint-port-range", dict(section="x", metrics=dict(a=dict(address="h", port=70000))), None, "metrics.a.port"),
    ("endpoint-port-bool", dict(section="x", metrics=dict(a=dict(address="h", port=True))), None, "metrics.a.port"),
    ("endpoint-no-address", dict(section="x", metrics=dict(a=dict(port=1))), None, "metrics.a.address"),
    ("endpoint-path", dict(section="x", metrics=dict(a=dict(address="h", port=1, path="m"))), None, "metrics.a.path"),
    (
        "endpoint-scheme",
        dict(section="x", metrics=dict(a=dict(address="h", port=1, scheme="ftp"))),
        None,
        "metrics.a.scheme",
    ),
    (
        "endpoint-auth",
        dict(section="x", metrics=dict(a=dict(address="h", port=1, auth="yes"))),
        None,
        "metrics.a.auth",
    ),
    (
        "endpoint-labels",
        dict(section="x", metrics=dict(a=dict(address="h", port=1, labels=dict(color=1)))),
        None,
        "metrics.a.labels",
    ),
    ("endpoint-unknown-key", dict(section="x", metrics=dict(a=dict(address="h", port=1, tls=1))), None, "unknown"),
    ("endpoint-name", dict(section="x", metrics={"a-b": dict(address="h", port=1)}), None, "endpoint name"),
    ("endpoint-not-a-mapping", dict(section="x", metrics=dict(a=9100)), None, "must be a mapping"),
    (
        "endpoint-owned-by-another-section",
        dict(section="x", metrics=dict(haproxy=HAPROXY)),
        json.dumps(dict(version=1, metrics=dict(haproxy=HAPROXY_FULL))),
        "already published by section traffic_switch",
    ),
    ("file-not-json", dict(section="x", data={}), "{torn", "not valid JSON"),
    ("file-not-an-object", dict(section="x", data={}), "[1, 2]", "not an object"),
]


@pytest.mark.parametrize(("args", "text", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_changes_nothing(tmp_path, capsys, args, text, fragment):
    path = tmp_path / "sovereign.fact"
    if text is not None:
        path.write_text(text)
    result = _run(capsys, path, **args)
    assert result["failed"] is True
    assert fragment in result["msg"], result["msg"]
    assert result["changed"] is False
    assert (path.read_text() if path.exists() else None) == text
    assert sorted(os.listdir(tmp_path)) == (["sovereign.fact"] if text is not None else [])


def test_path_is_a_directory(tmp_path, capsys):
    result = _run(capsys, tmp_path, section="runtime", data=RUNTIME)
    assert result["failed"] is True
    assert "is a directory" in result["msg"]


def test_unwritable_directory_fails_clearly(tmp_path, capsys):
    (tmp_path / "facts.d").write_text("a file where the directory should be\n")
    result = _run(capsys, tmp_path / "facts.d" / "sovereign.fact", section="runtime", data=RUNTIME)
    assert result["failed"] is True
    assert "could not write" in result["msg"]
    assert "become: true" in result["msg"]
    assert (tmp_path / "facts.d").read_text() == "a file where the directory should be\n"


# -- readers (module_utils) ----------------------------------------------------------------------------------------

RESOLVE = [
    ("option-wins", {"map_file": "/x"}, {"traffic_switch": {"map_file": "/c"}}, {"map_file": ("/x", "option")}),
    ("contract-next", {"map_file": None}, {"traffic_switch": {"map_file": "/c"}}, {"map_file": ("/c", "contract")}),
    ("default-last", {"map_file": None}, {"runtime": {}}, {"map_file": ("/d", "default")}),
    ("no-contract", {"map_file": None}, None, {"map_file": ("/d", "default")}),
]


@pytest.mark.parametrize(("params", "contract", "expected"), [c[1:] for c in RESOLVE], ids=[c[0] for c in RESOLVE])
def test_resolve(params, contract, expected):
    params = dict(params)
    source = _host_contract.resolve(params, contract, {"map_file": (("traffic_switch", "map_file"), "/d")})
    assert {k: (params[k], source[k]) for k in expected} == expected


@pytest.mark.parametrize(
    ("address", "port", "url"),
    [
        ("0.0.0.0", 8000, "http://127.0.0.1:8000"),
        ("::", 8000, "http://127.0.0.1:8000"),
        ("10.0.0.5", "80", "http://10.0.0.5:80"),
        ("fd00::5", 8000, "http://[fd00::5]:8000"),
    ],
)
def test_http_url(address, port, url):
    assert _host_contract.http_url(address, port) == url


def test_runtime_colors():
    contract = dict(runtime=dict(colors=dict(blue=dict(host="0.0.0.0", port=8001), green=dict(port=8002))))
    assert _host_contract.runtime_colors(contract) == dict(
        blue=dict(host="127.0.0.1", port=8001), green=dict(host="127.0.0.1", port=8002)
    )
    assert _host_contract.runtime_colors({}) is None
