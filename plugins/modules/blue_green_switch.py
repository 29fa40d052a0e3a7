#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: blue_green_switch
short_description: Make a color live on a host's HAProxy traffic switch
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._traffic_switch
  - sovereign.mlops._traffic_switch.admin_socket
  - sovereign.mlops._host_contract
description:
  - Flips the live color (C(blue) or C(green)) of one inference host's HAProxy traffic switch, as templated by
    the C(sovereign.mlops.traffic_switch) role (see docs/adr/0201-traffic-switch-haproxy-map.md).
  - The live color is one entry of an HAProxy map file. The module reads the entry from the running HAProxy
    (C(show map)) and from the file; when they disagree it says so and converges both to O(color).
  - It refuses, changing nothing, when the target color is not healthy when checked directly on its own port
    (not through the switch) or when HAProxy's own health check does not report its server usable
    (C(DOWN), C(MAINT), C(DRAIN), ...). There is no way to force a switch to an unhealthy color.
  - It flips the entry through the admin socket (C(set map)), without reloading HAProxy, and rewrites the map
    file atomically (temporary file, fsync, rename) so a restart keeps the color.
  - It then confirms through the frontend that new requests are answered by the target (response header
    C(X-Sovereign-Color)); when confirmation fails it flips back, restores the file and fails.
  - Finally it drains the previous color, waiting until its backend has no current session or O(drain_timeout)
    passes (a timeout is a warning, not a failure; the previous color keeps running as a warm standby).
  - The whole operation holds a per-host C(flock) on O(lock_path), so two switches on one host never interleave.
options:
  color:
    description:
      - The color to make live.
    type: str
    required: true
    choices: [blue, green]
  colors:
    description:
      - Where each color's runtime listens, used for the direct health check.
      - Each value is a mapping with C(port) (required) and C(host) (default C(127.0.0.1)).
      - "Default from O(contract) (C(runtime.colors), each color's C(host) and C(port)), else
        C({blue: {port: 8001}, green: {port: 8002}})."
    type: dict
  health_path:
    description:
      - Readiness path of the runtime (Open Inference Protocol C(/v2/health/ready)); must answer 200.
      - Default from O(contract) (C(traffic_switch.health_path)), else C(/v2/health/ready).
    type: str
  health_timeout:
    description:
      - Seconds to wait for the direct health check to answer.
    type: float
    default: 5
  frontend_url:
    description:
      - Base URL of the switch's frontend, used to confirm that new requests reach O(color).
      - Default from O(contract) (C(traffic_switch.frontend.url)), else C(http://127.0.0.1:8000).
    type: str
  confirm_path:
    description:
      - Path requested through the frontend to confirm the switch. Defaults to O(health_path).
    type: str
  confirm_requests:
    description:
      - How many consecutive requests through the frontend must be answered by O(color) (each on a new
        connection). V(0) skips confirmation.
    type: int
    default: 3
  confirm_timeout:
    description:
      - Seconds allowed to collect O(confirm_requests) consecutive confirmations before flipping back.
    type: float
    default: 10
  drain_timeout:
    description:
      - Seconds to wait for the previous color's backend to have no current session. V(0) does not wait.
    type: float
    default: 30
  lock_path:
    description:
      - Per-host lock file (C(flock)); its directory is created when missing.
    type: path
    default: /run/sovereign/blue_green_switch.lock
  lock_timeout:
    description:
      - Seconds to wait for another switch on this host to finish before failing.
    type: float
    default: 60
  socket_timeout:
    description:
      - Seconds to wait for HAProxy to answer one admin-socket command.
    type: float
    default: 5
attributes:
  check_mode:
    support: full
    details:
      - In check mode the module reads the live color, runs the direct and HAProxy health checks (and fails like
        a real run would), and reports whether it would switch. It changes nothing and takes no lock.
  diff_mode:
    support: full
    details:
      - The diff shows the map file before and after (the live-color entry).
notes:
  - The HAProxy configuration must follow the C(traffic_switch) role's template, which is the contract of this
    module, in particular backend C(be_<color>) holding one server named C(<color>), the
    C(X-Sovereign-Color) response header and C(use_backend be_%[str(live),map(<map_file>,<default>)]).
  - "Needs write access to the admin socket, O(map_file) and O(lock_path); usually C(become: true)."
seealso:
  - module: sovereign.mlops.smoke_test
"""

EXAMPLES = r"""
- name: Make green live (refuses if green is not healthy)
  sovereign.mlops.blue_green_switch:
    color: green
  become: true

- name: Roll back to blue quickly, without waiting for green to drain
  sovereign.mlops.blue_green_switch:
    color: blue
    drain_timeout: 0

- name: Would we switch? (reads and checks only)
  sovereign.mlops.blue_green_switch:
    color: green
  check_mode: true
  register: would_switch

- name: Custom ports and map location
  sovereign.mlops.blue_green_switch:
    color: blue
    colors:
      blue: {port: 9001}
      green: {port: 9002, host: 127.0.0.2}
    frontend_url: http://127.0.0.1:9000
    map_file: /etc/haproxy/maps/live.map
    admin_socket: /run/haproxy/admin.sock
"""

RETURN = r"""
color:
  description: The color that is live now (or would be, in check mode).
  returned: success
  type: str
  sample: green
previous_color:
  description:
    - The color the running HAProxy routed to before the module ran (from C(show map)).
    - V(null) when the map had no entry for O(map_key).
  returned: success
  type: str
  sample: blue
file_color:
  description: The color the map file held before the module ran (V(null) when the file or entry was missing).
  returned: success
  type: str
  sample: blue
drain_seconds:
  description: Seconds spent waiting for the previous color's backend to have no current session.
  returned: success
  type: float
  sample: 1.21
drained:
  description: Whether the previous color had no current session when the module returned.
  returned: success
  type: bool
  sample: true
switched_at:
  description: When the runtime map was flipped (ISO 8601, UTC); V(null) when nothing was flipped.
  returned: success
  type: str
  sample: "2026-03-01T12:00:00Z"
confirmed_requests:
  description: How many consecutive requests through the frontend were answered by O(color).
  returned: success
  type: int
  sample: 3
target_status:
  description: HAProxy's check status of the target color's server (C(show stat)).
  returned: success
  type: str
  sample: UP
"""

import contextlib
import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._files import (
    map_value,
    read_text,
    render_map,
    write_atomic,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._haproxy import (
    AdminSocket,
    HAProxyError,
    backend_name,
    backend_sessions,
    del_map_key,
    get_map_value,
    server_is_usable,
    server_name,
    server_status,
    set_map_value,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import resolve, runtime_colors
from ansible_collections.sovereign.mlops.plugins.module_utils._ledger import utc_now_iso
from ansible_collections.sovereign.mlops.plugins.module_utils._oip import (
    TRANSPORT_ERRORS,
    URLError,
    describe_transport_error,
    excerpt,
    http_get,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._switch_lock import LockTimeout, SwitchLock

COLORS = ("blue", "green")

# Options that default from the host contract (docs/architecture.md, "Host contract"), then to these values.
CONTRACT_DEFAULTS = dict(
    admin_socket=(("traffic_switch", "admin_socket"), "/run/haproxy/admin.sock"),
    map_file=(("traffic_switch", "map_file"), "/etc/haproxy/sovereign/live.map"),
    map_key=(("traffic_switch", "map_key"), "live"),
    colors=(runtime_colors, dict(blue=dict(port=8001), green=dict(port=8002))),
    health_path=(("traffic_switch", "health_path"), "/v2/health/ready"),
    frontend_url=(("traffic_switch", "frontend", "url"), "http://127.0.0.1:8000"),
)


class NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


class Switch:
    def __init__(self, module):
        self.module = module
        p = module.params
        self.p = p
        self.color = p["color"]
        self.sock = AdminSocket(p["admin_socket"], timeout=p["socket_timeout"])
        self.colors = self._colors(p["colors"])
        self.result = dict(
            changed=False,
            color=self.color,
            previous_color=None,
            file_color=None,
            drain_seconds=0.0,
            drained=True,
            switched_at=None,
            confirmed_requests=0,
            target_status=None,
        )

    def _colors(self, colors):
        out = {}
        for name, spec in (colors or {}).items():
            if name not in COLORS:
                self.module.fail_json(msg=f"colors: unknown color '{name}' (choices: blue, green)")
            if not isinstance(spec, dict) or "port" not in spec:
                self.module.fail_json(msg=f"colors.{name} must be a mapping with a port, e.g. {{port: 8002}}")
            try:
                port = int(spec["port"])
            except (TypeError, ValueError):
                self.module.fail_json(msg="colors.{}.port must be an integer, got {!r}".format(name, spec["port"]))
            if not 0 < port < 65536:
                self.module.fail_json(msg=f"colors.{name}.port {port} is out of range")
            out[name] = dict(host=str(spec.get("host") or "127.0.0.1"), port=port)
        if self.color not in out:
            self.module.fail_json(
                msg=f"colors has no entry for '{self.color}': give its port, "
                f"e.g. colors: {{{self.color}: {{port: 8002}}}}"
            )
        return out

    # -- checks ------------------------------------------------------------------------------------------------

    def direct_health_url(self, color):
        spec = self.colors[color]
        host = spec["host"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return "http://{}:{}{}".format(host, spec["port"], self.p["health_path"])

    def check_direct_health(self):
        """Error text when the target is not ready on its own port, else None."""
        url = self.direct_health_url(self.color)
        try:
            status, _dummy, body = http_get(url, timeout=self.p["health_timeout"])
        except TRANSPORT_ERRORS as exc:
            return f"{url} is unreachable ({describe_transport_error(exc)})"
        if status != 200:
            return "{} answered {}: {}".format(url, status, excerpt(body) or "(empty body)")
        return None

    def haproxy_target_status(self):
        return server_status(self.sock, self.color)

    # -- flip -------------------------------------------------------------------------------------------------

    def set_runtime(self, value):
        if value is None:
            del_map_key(self.sock, self.p["map_file"], self.p["map_key"])
        else:
            set_map_value(self.sock, self.p["map_file"], self.p["map_key"], value)

    def restore_file(self, text):
        if text is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.p["map_file"])
        else:
            write_atomic(self.p["map_file"], text)

    def fail(self, msg):
        self.result.pop("diff", None)
        self.module.fail_json(msg=msg, **self.result)

    def confirm(self):
        """Count consecutive frontend answers from the target; returns (count, last observation)."""
        wanted = self.p["confirm_requests"]
        url = self.p["frontend_url"].rstrip("/") + (self.p["confirm_path"] or self.p["health_path"])
        deadline = time.monotonic() + self.p["confirm_timeout"]
        streak = 0
        last = "no request sent"
        while streak < wanted:
            try:
                status, headers, _dummy = http_get(url, timeout=self.p["health_timeout"])
                answered_by = headers.get("x-sovereign-color")
                last = "{} answered {} from color {}".format(
                    url, status, answered_by or "(no X-Sovereign-Color header)"
                )
                ok = status == 200 and answered_by == self.color
            except TRANSPORT_ERRORS as exc:
                last = f"{url} is unreachable ({describe_transport_error(exc)})"
                ok = False
            if ok:
                streak += 1
                continue
            streak = 0
            if time.monotonic() >= deadline:
                return streak, last
            time.sleep(0.1)
        return streak, last

    def drain(self, old):
        deadline = time.monotonic() + self.p["drain_timeout"]
        start = time.monotonic()
        while True:
            try:
                sessions = backend_sessions(self.sock, old)
            except HAProxyError as exc:
                self.module.warn(f"could not watch {old} drain: {exc}")
                return False, time.monotonic() - start, -1
            if sessions == 0:
                return True, time.monotonic() - start, 0
            if time.monotonic() >= deadline:
                return False, time.monotonic() - start, sessions
            time.sleep(0.1)

    # -- main -------------------------------------------------------------------------------------------------

    def run(self):
        module = self.module
        p = self.p
        map_file = p["map_file"]
        key = p["map_key"]

        runtime_color = get_map_value(self.sock, map_file, key)
        file_text = read_text(map_file)
        file_color = map_value(file_text, key) if file_text is not None else None
        self.result["previous_color"] = runtime_color
        self.result["file_color"] = file_color
        if runtime_color != file_color:
            module.warn(
                "HAProxy routes to {} (runtime map) but {} says {}: converging both to {}.".format(
                    runtime_color or "(no entry)",
                    map_file,
                    file_color or ("(no entry)" if file_text is not None else "(missing file)"),
                    self.color,
                )
            )

        new_text = render_map(file_text, key, self.color)
        file_changes = file_text != new_text
        runtime_changes = runtime_color != self.color
        self.result["diff"] = dict(
            before=file_text or "", after=new_text, before_header=map_file, after_header=map_file
        )

        # Health is a hard gate for a switch. When the color already takes traffic there is nothing to gate,
        # but an unhealthy live color is worth a warning.
        problem = self.check_direct_health()
        status = self.haproxy_target_status()
        self.result["target_status"] = status
        if runtime_changes:
            if problem:
                self.fail(
                    f"refusing to switch to {self.color}: its direct health check failed: {problem}. Nothing was "
                    f"changed; fix the {self.color} runtime and retry."
                )
            if not server_is_usable(status):
                self.fail(
                    "refusing to switch to {}: HAProxy reports server {}/{} as '{}' (its own check on {} "
                    "fails or the server is disabled). Nothing was changed; see 'show stat' on {}.".format(
                        self.color,
                        backend_name(self.color),
                        server_name(self.color),
                        status,
                        p["health_path"],
                        p["admin_socket"],
                    )
                )
        else:
            if problem:
                module.warn(f"{self.color} is already live but its direct health check failed: {problem}")
            elif not server_is_usable(status):
                module.warn(f"{self.color} is already live but HAProxy reports its server as '{status}'")

        if not runtime_changes and not file_changes:
            self.result.pop("diff")
            module.exit_json(**self.result)

        self.result["changed"] = True
        if module.check_mode:
            module.exit_json(**self.result)

        if runtime_changes:
            self.set_runtime(self.color)
            self.result["switched_at"] = utc_now_iso()
        try:
            if file_changes:
                write_atomic(map_file, new_text)
        except OSError as exc:
            note = "nothing was flipped"
            if runtime_changes:
                self.set_runtime(runtime_color)
                self.result["switched_at"] = None
                note = "HAProxy was flipped back to %s" % (runtime_color or "(no entry)")
            self.result["changed"] = False
            self.fail(f"could not write {map_file} ({exc}); {note}. Check that its directory exists and is writable.")

        if not runtime_changes:
            module.exit_json(**self.result)

        if p["confirm_requests"] > 0:
            count, last = self.confirm()
            self.result["confirmed_requests"] = count
            if count < p["confirm_requests"]:
                try:
                    self.set_runtime(runtime_color)
                    rollback_note = "flipped HAProxy back to %s" % (runtime_color or "(no entry)")
                    self.result["changed"] = False
                    self.result["color"] = runtime_color
                    self.result["switched_at"] = None
                except HAProxyError as exc:
                    rollback_note = f"and COULD NOT flip HAProxy back to {runtime_color} ({exc})"
                try:
                    if file_changes:
                        self.restore_file(file_text)
                        rollback_note += f"; restored {map_file}"
                except OSError as exc:
                    rollback_note += f"; could not restore {map_file} ({exc})"
                self.fail(
                    "switch to {} not confirmed: {} of {} consecutive requests through {} were answered by {} "
                    "within {}s (last: {}); {}. Check frontend_url and that haproxy.cfg routes by the map "
                    "entry.".format(
                        self.color,
                        count,
                        p["confirm_requests"],
                        p["frontend_url"],
                        self.color,
                        p["confirm_timeout"],
                        last,
                        rollback_note,
                    )
                )

        if runtime_color is not None and runtime_color != self.color:
            drained, seconds, left = self.drain(runtime_color)
            self.result["drained"] = drained
            self.result["drain_seconds"] = round(seconds, 3)
            if not drained and left >= 0:
                timeout = p["drain_timeout"]
                module.warn(
                    f"{runtime_color} still had {left} session(s) after drain_timeout={timeout}s; they continue on "
                    f"{runtime_color}, which keeps running as a warm standby."
                )
        module.exit_json(**self.result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            color=dict(type="str", required=True, choices=list(COLORS)),
            admin_socket=dict(type="path"),
            map_file=dict(type="path"),
            map_key=dict(type="str", no_log=False),
            colors=dict(type="dict"),
            health_path=dict(type="str"),
            health_timeout=dict(type="float", default=5.0),
            frontend_url=dict(type="str"),
            confirm_path=dict(type="str"),
            confirm_requests=dict(type="int", default=3),
            confirm_timeout=dict(type="float", default=10.0),
            drain_timeout=dict(type="float", default=30.0),
            lock_path=dict(type="path", default="/run/sovereign/blue_green_switch.lock"),
            lock_timeout=dict(type="float", default=60.0),
            socket_timeout=dict(type="float", default=5.0),
            contract=dict(type="dict"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    resolve(p, p["contract"], CONTRACT_DEFAULTS)
    for name in ("health_timeout", "confirm_timeout", "drain_timeout", "lock_timeout", "socket_timeout"):
        if p[name] < 0:
            module.fail_json(msg=f"{name} must be >= 0, got {p[name]}")
    if p["confirm_requests"] < 0:
        module.fail_json(msg="confirm_requests must be >= 0, got {}".format(p["confirm_requests"]))
    for name in ("health_path", "confirm_path"):
        if p[name] is not None and not p[name].startswith("/"):
            module.fail_json(msg=f"{name} must start with '/', got {p[name]!r}")
    if any(c.isspace() for c in p["map_key"]) or not p["map_key"]:
        module.fail_json(msg="map_key must be one word without spaces, got {!r}".format(p["map_key"]))
    if not p["frontend_url"].startswith(("http://", "https://")):
        module.fail_json(msg="frontend_url must be an http:// or https:// URL, got {!r}".format(p["frontend_url"]))

    switch = Switch(module)
    lock = (
        NullLock()
        if module.check_mode
        else SwitchLock(p["lock_path"], timeout=p["lock_timeout"], purpose="blue_green_switch to {}".format(p["color"]))
    )
    try:
        with lock:
            switch.run()
    except LockTimeout as exc:
        module.fail_json(msg=str(exc), lock_holder=exc.holder)
    except HAProxyError as exc:
        switch.fail(str(exc))
    except URLError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg=f"{exc.__class__.__name__}: {exc}", exception=traceback.format_exc())


if __name__ == "__main__":
    main()
