# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""HAProxy runtime-API helpers for the sovereign.mlops traffic switch.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise, import it
only from this collection's modules and tests.

What it knows about:

* the admin socket (``stats socket ... level admin``): one command per connection, answer read to EOF;
* ``show map`` / ``set map`` / ``add map`` / ``del map`` for the live-color map entry;
* ``show stat`` CSV (server status, backend current sessions);
* the weighted, sticky split between the two colors (docs/adr/1401): :func:`sticky_bucket`, :func:`shares`,
  :func:`arm_of`, :func:`key_in_range` - the Python twin of the frontend's routing rules in haproxy.cfg.j2.

The map file on disk (``<key> <value>`` lines) is parsed, rendered and written by ``_files``.

The naming contract shared with ``roles/traffic_switch/templates/haproxy.cfg.j2``: backend
``be_<color>`` holding one server named ``<color>``.
"""

from __future__ import annotations

import csv
import errno
import io
import socket
import zlib


def backend_name(color):
    """Backend that serves ``color`` (contract with haproxy.cfg.j2)."""
    return f"be_{color}"


def server_name(color):
    """Server inside :func:`backend_name` (contract with haproxy.cfg.j2)."""
    return color


class HAProxyError(Exception):
    """A runtime-API operation failed; ``str(exc)`` names the problem and the fix."""


class AdminSocket:
    """Talks to HAProxy's admin socket, one command per connection (non-interactive mode)."""

    def __init__(self, path, timeout=5.0):
        self.path = path
        self.timeout = timeout

    def _connect_error(self, exc):
        path = self.path
        if isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == errno.ENOENT:
            return HAProxyError(
                f"HAProxy admin socket {path} does not exist: HAProxy is not running on this host, or its config "
                f"has no 'stats socket {path} mode 660 level admin' line. Start HAProxy (systemctl start haproxy) "
                "or set admin_socket to the path in haproxy.cfg."
            )
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
            return HAProxyError(
                f"permission denied on HAProxy admin socket {path}: run the task with become: true, or as a member "
                "of the socket's group (the socket is 'mode 660')."
            )
        if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
            return HAProxyError(
                f"nothing listens on HAProxy admin socket {path} (a stale socket file): HAProxy is not running. "
                "Start it (systemctl start haproxy) and retry."
            )
        if isinstance(exc, socket.timeout):
            return HAProxyError(
                f"HAProxy admin socket {path} did not answer within {self.timeout}s: HAProxy is overloaded or "
                "stuck; check 'systemctl status haproxy'."
            )
        return HAProxyError(f"cannot talk to HAProxy admin socket {path}: {exc}")

    def command(self, cmd):
        """Send one command, return HAProxy's answer as text (trailing blank line stripped)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        chunks = []
        try:
            try:
                sock.connect(self.path)
                sock.sendall(cmd.encode("utf-8") + b"\n")
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            except (TimeoutError, OSError) as exc:
                raise self._connect_error(exc) from None
        finally:
            sock.close()
        answer = b"".join(chunks).decode("utf-8", "replace")
        stripped = answer.strip()
        if stripped.startswith("Permission denied"):
            verb = " ".join(cmd.split(" ")[0:2])
            raise HAProxyError(
                f"HAProxy refused '{verb}' on {self.path}: the socket is not at 'level admin'. Use "
                f"'stats socket {self.path} mode 660 level admin' in haproxy.cfg."
            )
        if stripped.startswith("Unknown command"):
            raise HAProxyError(f"HAProxy does not know the command '{cmd}' (answer: {stripped.splitlines()[0]})")
        return answer.rstrip("\n") + ("\n" if answer.strip() else "")


# ---------------------------------------------------------------------------------------------------------------
# show map
# ---------------------------------------------------------------------------------------------------------------


def parse_map_list(text):
    """Parse ``show map`` (no argument) into a list of ``{'id': int, 'file': str}``."""
    maps = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[1].startswith("(") or not parts[1].endswith(")"):
            continue
        try:
            map_id = int(parts[0])
        except ValueError:
            continue
        maps.append({"id": map_id, "file": parts[1][1:-1]})
    return maps


def parse_show_map(text):
    """Parse ``show map <file>`` into a list of ``(key, value)`` in HAProxy's order.

    Each line is ``<pointer> <key> <value>``; the value is the rest of the line (it may hold spaces).
    """
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("0x"):
            raise HAProxyError(f"unexpected 'show map' line from HAProxy: {line!r}")
        entries.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return entries


def show_map(sock, map_file):
    """Entries of the runtime map loaded from ``map_file``; fails clearly if HAProxy has no such map."""
    answer = sock.command(f"show map {map_file}")
    if answer.strip().startswith("Unknown map identifier"):
        loaded = [m["file"] for m in parse_map_list(sock.command("show map"))]
        raise HAProxyError(
            "HAProxy has no map loaded from {} (loaded maps: {}). map_file must be the exact path used in "
            "haproxy.cfg's map() converter.".format(map_file, ", ".join(loaded) or "none")
        )
    return parse_show_map(answer)


def get_map_value(sock, map_file, key):
    """Value of ``key`` in the runtime map (last one wins, like a lookup), or None when absent."""
    values = [v for k, v in show_map(sock, map_file) if k == key]
    return values[-1] if values else None


def set_map_value(sock, map_file, key, value):
    """Set ``key`` to ``value`` in the runtime map (``set map``, falling back to ``add map`` when absent)."""
    answer = sock.command(f"set map {map_file} {key} {value}").strip()
    if answer.startswith("entry not found"):
        answer = sock.command(f"add map {map_file} {key} {value}").strip()
    if answer:
        raise HAProxyError(f"HAProxy refused to set {key}={value} in map {map_file}: {answer}")


def del_map_key(sock, map_file, key):
    """Remove ``key`` from the runtime map (no error when absent)."""
    answer = sock.command(f"del map {map_file} {key}").strip()
    if answer and not answer.startswith("entry not found") and not answer.startswith("Key not found"):
        raise HAProxyError(f"HAProxy refused to delete {key} from map {map_file}: {answer}")


# ---------------------------------------------------------------------------------------------------------------
# show stat
# ---------------------------------------------------------------------------------------------------------------


def parse_show_stat(text):
    """Parse ``show stat`` CSV into a list of dicts keyed by the header fields (``pxname``, ``svname``, ...)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected 'show stat' answer from HAProxy: {text[:200]!r}")
    header = lines[0][2:]
    reader = csv.DictReader(io.StringIO("\n".join([header, *lines[1:]])))
    rows = []
    for row in reader:
        rows.append(dict((k, v) for k, v in row.items() if k and k != "-"))
    return rows


def find_stat(rows, pxname, svname):
    """The ``show stat`` row of ``pxname``/``svname`` (svname may be FRONTEND or BACKEND), or None."""
    for row in rows:
        if row.get("pxname") == pxname and row.get("svname") == svname:
            return row
    return None


def stat_int(row, field):
    """Integer value of a ``show stat`` field (empty means 0)."""
    value = (row or {}).get(field) or "0"
    try:
        return int(value)
    except ValueError:
        return 0


# A server takes traffic in these states ("UP 1/2" = up, one failed check towards fall). "no check" means
# checks are disabled: HAProxy treats the server as up.
_USABLE_STATUS = ("UP", "no check")


def server_is_usable(status):
    """True when HAProxy would send traffic to a server whose ``show stat`` status is ``status``."""
    status = (status or "").strip()
    return any(status == s or status.startswith(s + " ") for s in _USABLE_STATUS)


def server_status(sock, color):
    """``show stat`` status of the server that serves ``color`` (``UP``, ``DOWN``, ``MAINT``, ...)."""
    rows = parse_show_stat(sock.command("show stat"))
    row = find_stat(rows, backend_name(color), server_name(color))
    if row is None:
        raise HAProxyError(
            f"HAProxy has no server {backend_name(color)}/{server_name(color)}: haproxy.cfg was not rendered from "
            "the traffic_switch role's haproxy.cfg.j2 (backend be_<color> with one server named <color>), or the "
            "color is not configured."
        )
    return row.get("status", "")


def backend_sessions(sock, color):
    """Current sessions plus queued requests on the backend of ``color`` (0 = drained)."""
    rows = parse_show_stat(sock.command("show stat"))
    row = find_stat(rows, backend_name(color), "BACKEND")
    if row is None:
        raise HAProxyError(f"HAProxy has no backend {backend_name(color)}.")
    return stat_int(row, "scur") + stat_int(row, "qcur")


# ---------------------------------------------------------------------------------------------------------------
# The split (docs/adr/1401): "<live key> <color>", "<canary key> <color>", "<weight key> <0-100>" in the map file.
# haproxy.cfg.j2 routes a request to the canary color when its bucket < weight; the bucket is
# crc32(sticky key) mod BUCKETS for a request with a key (header, else cookie), else rand(BUCKETS).
# ---------------------------------------------------------------------------------------------------------------

BUCKETS = 100


def sticky_bucket(key):
    """The bucket (0..BUCKETS-1) HAProxy gives a request whose sticky key is ``key`` (``crc32,mod(100)``)."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return zlib.crc32(data) % BUCKETS


def parse_weight(value):
    """The weight HAProxy routes by for a map value: an integer 0-100; absent, not a number or negative is 0
    (the frontend's comparison fails and the request goes to the live color), above 100 is 100."""
    if value is None:
        return 0
    try:
        weight = int(str(value).strip())
    except ValueError:
        return 0
    return max(0, min(BUCKETS, weight))


def shares(live, canary, weight, colors=("blue", "green")):
    """``{color: percent}`` of requests each color gets for a map state (the live color's is the rest)."""
    out = dict((c, 0) for c in colors)
    weight = parse_weight(weight)
    if live not in out:
        return out
    if canary in out and canary != live and weight > 0:
        out[canary] = weight
        out[live] = BUCKETS - weight
    else:
        out[live] = BUCKETS
    return out


def arm_of(key, live, canary, weight):
    """The color a request with sticky key ``key`` lands on for a map state (both servers usable)."""
    weight = parse_weight(weight)
    if canary and canary != live and sticky_bucket(key) < weight:
        return canary
    return live


def key_in_range(low, high, prefix="sovereign-probe-"):
    """The first ``<prefix><n>`` whose bucket is in ``[low, high)``; None for an empty range."""
    if not 0 <= low < high <= BUCKETS:
        return None
    n = 0
    while True:
        key = f"{prefix}{n}"
        if low <= sticky_bucket(key) < high:
            return key
        n += 1
