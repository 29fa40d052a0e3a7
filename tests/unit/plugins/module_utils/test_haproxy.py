# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Tables for plugins/module_utils/_haproxy.py: runtime-API parsing and socket errors (map file text
and the atomic write: test_files.py);
and the role's haproxy.cfg.j2 rendered with several variable sets and checked by ``haproxy -c``."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import tempfile

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _haproxy
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    HAPROXY,
    HAProxy,
    needs_haproxy,
    render_haproxy_cfg,
    template_vars,
)
from ports import free_port

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "plugins" / "modules" / "release_fixtures"

# ---------------------------------------------------------------------------------------------------------------
# show map
# ---------------------------------------------------------------------------------------------------------------

SHOW_MAP = [
    ("one-entry", "0x562b47b610b0 live blue\n\n", [("live", "blue")]),
    ("two-entries", "0x1 live blue\n0x2 other x\n", [("live", "blue"), ("other", "x")]),
    ("empty-map", "\n", []),
    ("value-with-spaces", "0x1 k two words\n", [("k", "two words")]),
    ("key-without-value", "0x1 k\n", [("k", "")]),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in SHOW_MAP], ids=[c[0] for c in SHOW_MAP])
def test_parse_show_map(text, expected):
    assert _haproxy.parse_show_map(text) == expected


def test_parse_show_map_rejects_garbage():
    with pytest.raises(_haproxy.HAProxyError, match="unexpected"):
        _haproxy.parse_show_map("Unknown map identifier. Please use #<id> or <file>.\n")


MAP_LISTS = [
    (
        "haproxy-2.6",
        "# id (file) description\n3 (/etc/haproxy/sovereign/live.map) pattern loaded from file "
        "'/etc/haproxy/sovereign/live.map' used by map at file 'haproxy.cfg' line 37. curr_ver=0 "
        "next_ver=0 entry_cnt=1\n\n",
        [{"id": 3, "file": "/etc/haproxy/sovereign/live.map"}],
    ),
    ("none", "# id (file) description\n\n", []),
    (
        "two",
        "# id (file) description\n1 (/a.map) x\n-1 (/b.map) y\n",
        [{"id": 1, "file": "/a.map"}, {"id": -1, "file": "/b.map"}],
    ),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in MAP_LISTS], ids=[c[0] for c in MAP_LISTS])
def test_parse_map_list(text, expected):
    assert _haproxy.parse_map_list(text) == expected


# ---------------------------------------------------------------------------------------------------------------
# show stat (a capture from HAProxy 2.6 with one request in flight on blue and green DOWN)
# ---------------------------------------------------------------------------------------------------------------

STAT_ROWS = [
    ("blue-server", "be_blue", "blue", dict(status="UP", scur="1")),
    ("blue-backend", "be_blue", "BACKEND", dict(status="UP", scur="1", qcur="0")),
    ("green-server", "be_green", "green", dict(status="DOWN", scur="0", addr="127.0.0.1:8002")),
    ("frontend", "fe_inference", "FRONTEND", dict(status="OPEN", scur="1", mode="http")),
]


@pytest.mark.parametrize("pxname,svname,fields", [c[1:] for c in STAT_ROWS], ids=[c[0] for c in STAT_ROWS])
def test_parse_show_stat_capture(pxname, svname, fields):
    rows = _haproxy.parse_show_stat((FIXTURES / "show_stat_haproxy26.csv").read_text())
    row = _haproxy.find_stat(rows, pxname, svname)
    assert row is not None
    for key, value in fields.items():
        assert row[key] == value


def test_parse_show_stat_missing_row_and_garbage():
    rows = _haproxy.parse_show_stat((FIXTURES / "show_stat_haproxy26.csv").read_text())
    assert _haproxy.find_stat(rows, "be_purple", "purple") is None
    assert _haproxy.stat_int(None, "scur") == 0
    with pytest.raises(_haproxy.HAProxyError, match="unexpected"):
        _haproxy.parse_show_stat("Permission denied\n")


STATUSES = [
    ("UP", True),
    ("UP 1/2", True),
    ("no check", True),
    ("DOWN", False),
    ("DOWN 1/2", False),
    ("MAINT", False),
    ("MAINT (via be/x)", False),
    ("DRAIN", False),
    ("NOLB", False),
    ("", False),
    (None, False),
]


@pytest.mark.parametrize("status,usable", STATUSES, ids=[str(s[0]) for s in STATUSES])
def test_server_is_usable(status, usable):
    assert _haproxy.server_is_usable(status) is usable


# ---------------------------------------------------------------------------------------------------------------
# admin socket errors (real sockets)
# ---------------------------------------------------------------------------------------------------------------


def _socket_missing(tmp):
    return str(tmp / "missing.sock"), "does not exist"


def _socket_stale(tmp):
    path = str(tmp / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # the file stays, nobody listens
    return path, "nothing listens"


def _socket_silent(tmp):
    path = str(tmp / "silent.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    _socket_silent.keep = sock  # accepts (backlog) but never answers
    return path, "did not answer within 0.2s"


def _socket_permission(tmp):
    if os.geteuid() == 0:
        pytest.skip("root bypasses socket file permissions")
    path = str(tmp / "perm.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    os.chmod(path, 0)
    _socket_permission.keep = sock
    return path, "permission denied"


SOCKET_ERRORS = [
    ("missing", _socket_missing),
    ("stale", _socket_stale),
    ("silent", _socket_silent),
    ("permission", _socket_permission),
]


@pytest.mark.parametrize("make", [c[1] for c in SOCKET_ERRORS], ids=[c[0] for c in SOCKET_ERRORS])
def test_admin_socket_errors(make):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    try:
        path, expected = make(tmp)
        with pytest.raises(_haproxy.HAProxyError) as info:
            _haproxy.AdminSocket(path, timeout=0.2).command("show info")
        assert expected in str(info.value) and path in str(info.value)
    finally:
        for attr in ("keep",):
            for fn in (_socket_silent, _socket_permission):
                if hasattr(fn, attr):
                    getattr(fn, attr).close()
                    delattr(fn, attr)
        for name in os.listdir(tmp):
            os.unlink(tmp / name)
        os.rmdir(tmp)


# ---------------------------------------------------------------------------------------------------------------
# against a real haproxy: the map commands, and the template with several variable sets
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def haproxy():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    values = template_vars(
        tmp, free_port(), free_port(), {"blue": {"port": free_port()}, "green": {"port": free_port()}}
    )
    (tmp / "haproxy.cfg").write_text(render_haproxy_cfg(values))
    (tmp / "live.map").write_text("live blue\n")
    proc = HAProxy(tmp / "haproxy.cfg", values["traffic_switch_admin_socket"]).start()
    try:
        yield _haproxy.AdminSocket(values["traffic_switch_admin_socket"]), values["traffic_switch_map_file"]
    finally:
        proc.stop()
        for name in os.listdir(tmp):
            os.unlink(tmp / name)
        os.rmdir(tmp)


@needs_haproxy
def test_map_commands_real(haproxy):
    sock, map_file = haproxy
    assert _haproxy.get_map_value(sock, map_file, "live") == "blue"
    _haproxy.set_map_value(sock, map_file, "live", "green")
    assert _haproxy.get_map_value(sock, map_file, "live") == "green"
    _haproxy.del_map_key(sock, map_file, "live")
    assert _haproxy.get_map_value(sock, map_file, "live") is None
    _haproxy.del_map_key(sock, map_file, "live")  # absent: no error
    _haproxy.set_map_value(sock, map_file, "live", "blue")  # absent: falls back to add map
    assert _haproxy.show_map(sock, map_file) == [("live", "blue")]
    with pytest.raises(
        _haproxy.HAProxyError, match=re.escape(f"no map loaded from /nope.map (loaded maps: {map_file})")
    ):
        _haproxy.show_map(sock, "/nope.map")
    assert _haproxy.server_status(sock, "blue") in ("DOWN", "UP")  # nothing listens: DOWN after the first check
    assert _haproxy.backend_sessions(sock, "green") == 0
    with pytest.raises(_haproxy.HAProxyError, match="no server be_purple/purple"):
        _haproxy.server_status(sock, "purple")
    with pytest.raises(_haproxy.HAProxyError, match="does not know the command"):
        sock.command("frobnicate")


TEMPLATE_VARIANTS = [
    ("tests", {}),
    (
        "production-like",
        dict(
            traffic_switch_log_target="/dev/log local0",
            traffic_switch_chroot="/var/lib/haproxy",
            traffic_switch_user="haproxy",
            traffic_switch_group="haproxy",
            traffic_switch_frontend_bind="0.0.0.0",
            traffic_switch_check_interval="1s",
            traffic_switch_check_fall=3,
            traffic_switch_check_rise=2,
            traffic_switch_maxconn=4096,
        ),
    ),
    ("other-hosts-and-default", dict(traffic_switch_default_color="green", traffic_switch_map_key="active")),
]


@needs_haproxy
@pytest.mark.parametrize("overrides", [c[1] for c in TEMPLATE_VARIANTS], ids=[c[0] for c in TEMPLATE_VARIANTS])
def test_template_is_valid(tmp_path, overrides):
    colors = {"blue": {"port": 8001}, "green": {"port": 8002, "host": "127.0.0.2"}}
    values = template_vars(tmp_path, 8000, 8404, colors, **overrides)
    text = render_haproxy_cfg(values)
    (tmp_path / "haproxy.cfg").write_text(text)
    (tmp_path / "live.map").write_text("{} blue\n".format(values["traffic_switch_map_key"]))
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The live color (and a split's canary, docs/adr/1401) from the map, per request.
    assert "use_backend be_%[var(txn.sovereign_color)]" in text
    assert (
        "set-var(txn.sovereign_color) str({}),map({},{})".format(
            values["traffic_switch_map_key"], values["traffic_switch_map_file"], values["traffic_switch_default_color"]
        )
        in text
    )
    assert "server green 127.0.0.2:8002 check" in text
    assert "http-response set-header X-Sovereign-Color green" in text
    assert "option httpchk GET /v2/health/ready" in text
    assert "level admin" in text and "prometheus-exporter" in text
    # Nothing pins a keep-alive client connection to a backend.
    config = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))
    for pinning in ("prefer-last-server", "httpclose", "http-server-close", "stick", "persist", "cookie"):
        assert pinning not in config
