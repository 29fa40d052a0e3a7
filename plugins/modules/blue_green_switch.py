#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: blue_green_switch
short_description: Make a color live on a host's HAProxy traffic switch, or split traffic between the colors by weight
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
  - Without O(weight), all traffic goes to O(color) afterwards - also when a split was set (a rollback during a
    canary is this call with the stable color).
  - "With O(weight), a B(split) instead (docs/adr/1401-weighted-sticky-split.md): O(color) gets O(weight) percent of
    the requests and the other color the rest; the live color (O(map_key)) stays what it is. The map file holds the
    split as two more entries, O(canary_key) (the other color than the live one) and O(weight_key) (percent of
    requests it gets), set over the admin socket in an order that never routes to a color that should get nothing,
    and persisted atomically with the live entry. A request carrying the sticky key (header O(sticky_header), or the
    role's cookie) goes to the canary when C(crc32(key) mod 100 < weight): the same key always lands on the same
    color for a given weight, and keys only ever move from the live color to the canary as the weight grows.
    Requests without a key are split at random by weight."
  - With O(weight), a color whose share grows must pass the same two health checks as a switch target; the split is
    confirmed through the frontend with sticky keys that hash to each color that gets traffic (O(confirm_requests)
    each, each on a new connection), else the previous split is restored and the module fails; a color whose share
    drops to 0 is drained like the previous color of a switch. V(weight=0) for the canary and V(weight=100) for the
    live color both mean "everything on the live color".
options:
  color:
    description:
      - The color to make live; with O(weight), the color that gets O(weight) percent of the requests.
    type: str
    required: true
    choices: [blue, green]
  weight:
    description:
      - Percent of requests (0-100) that O(color) gets; the other color gets the rest. Omitted - a switch, all
        traffic to O(color).
      - The live color does not change with a split; the map must already have a live entry (a first switch).
    type: int
  canary_key:
    description:
      - Key of the split's other color in O(map_file) (the role's C(traffic_switch_canary_key)).
      - Default from O(contract) (C(traffic_switch.split.canary_key)), else C(canary).
    type: str
  weight_key:
    description:
      - Key of the split's weight in O(map_file) (the role's C(traffic_switch_weight_key)).
      - Default from O(contract) (C(traffic_switch.split.weight_key)), else C(weight).
    type: str
  sticky_header:
    description:
      - The sticky-key request header of the traffic switch (the role's C(traffic_switch_sticky_header)), used to
        confirm a split with keys that hash to each color.
      - Default from O(contract) (C(traffic_switch.split.sticky_header)), else C(X-Sovereign-Key).
    type: str
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
      - In check mode the module reads the live color and the split, runs the direct and HAProxy health checks of
        every color whose share would grow (and fails like a real run would), and reports whether it would change
        and the shares it would set (RV(weights)). It changes nothing and takes no lock.
  diff_mode:
    support: full
    details:
      - The diff shows the map file before and after (the live-color entry and the split's entries).
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

- name: Canary - send 5 % of the requests to green (sticky by X-Sovereign-Key), blue keeps the rest
  sovereign.mlops.blue_green_switch:
    color: green
    weight: 5
  register: split

- name: Abort the canary - everything back on blue at once
  sovereign.mlops.blue_green_switch:
    color: blue
    drain_timeout: 0

- name: A/B experiment - half and half
  sovereign.mlops.blue_green_switch:
    color: green
    weight: 50

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
live_color:
  description: The live color afterwards (or in check mode, would be), the one that gets what the canary does not.
  returned: success
  type: str
  sample: blue
canary_color:
  description: The map's canary entry afterwards (the color of the split other than the live one); V(null) when none.
  returned: success
  type: str
  sample: green
weight:
  description: Percent of requests the canary color gets afterwards (0 = no split).
  returned: success
  type: int
  sample: 5
weights:
  description: Percent of requests each color gets afterwards (or would get, in check mode).
  returned: success
  type: dict
  sample: {blue: 95, green: 5}
previous_weights:
  description: Percent of requests each color got from the running HAProxy before the module ran.
  returned: success
  type: dict
  sample: {blue: 100, green: 0}
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
    BUCKETS,
    AdminSocket,
    HAProxyError,
    backend_name,
    backend_sessions,
    del_map_key,
    key_in_range,
    parse_weight,
    server_is_usable,
    server_name,
    server_status,
    set_map_value,
    shares,
    show_map,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import resolve, runtime_colors, url_host
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
    canary_key=(("traffic_switch", "split", "canary_key"), "canary"),
    weight_key=(("traffic_switch", "split", "weight_key"), "weight"),
    sticky_header=(("traffic_switch", "split", "sticky_header"), "X-Sovereign-Key"),
)


def plan_steps(runtime, target, keys):
    """The runtime commands from map state ``runtime`` to ``target`` ({key: value or None}; a None target leaves the
    entry as it is), [(key, value)], in an order whose every intermediate state routes only to colors that get
    traffic before or after: never to one that gets none in both. ``keys`` = (live, canary, weight)."""
    live_key, canary_key, weight_key = keys
    current = dict(runtime)
    out = []

    def put(key):
        if target[key] is not None and current[key] != target[key]:
            out.append((key, target[key]))
            current[key] = target[key]

    split_on = parse_weight(runtime[weight_key]) > 0
    moves = target[live_key] != runtime[live_key] or target[canary_key] != runtime[canary_key]
    if split_on and target[live_key] != runtime[live_key] and runtime[canary_key] == target[live_key]:
        put(live_key)  # the canary becomes live: both entries name it, every request goes to it
    elif split_on and moves and target[canary_key] is not None:
        out.append((weight_key, "0"))  # everything on the old live color while the entries move
        current[weight_key] = "0"
    put(live_key)
    put(canary_key)
    put(weight_key)
    return out


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
        return "http://{}:{}{}".format(url_host(spec["host"]), spec["port"], self.p["health_path"])

    def check_direct_health(self, color):
        """Error text when ``color`` is not ready on its own port, else None."""
        if color not in self.colors:
            return f"colors has no entry for '{color}' (give its port)"
        url = self.direct_health_url(color)
        try:
            status, _dummy, body = http_get(url, timeout=self.p["health_timeout"])
        except TRANSPORT_ERRORS as exc:
            return f"{url} is unreachable ({describe_transport_error(exc)})"
        if status != 200:
            return "{} answered {}: {}".format(url, status, excerpt(body) or "(empty body)")
        return None

    # -- state ------------------------------------------------------------------------------------------------

    def keys(self):
        return (self.p["map_key"], self.p["canary_key"], self.p["weight_key"])

    def runtime_state(self):
        """{key: value or None} of the three entries in the running HAProxy (last one wins, like a lookup)."""
        entries = show_map(self.sock, self.p["map_file"])
        out = {}
        for key in self.keys():
            values = [v for k, v in entries if k == key]
            out[key] = values[-1] if values else None
        return out

    def shares_of(self, state):
        live, canary, weight = (state.get(k) for k in self.keys())
        return shares(live, canary, weight, COLORS)

    def target_state(self, runtime):
        """The three entries after the operation (None = leave the entry as it is / absent)."""
        live_key, canary_key, weight_key = self.keys()
        weight = self.p["weight"]
        if weight is None:  # a switch: everything to color
            target = {live_key: self.color, canary_key: runtime[canary_key], weight_key: runtime[weight_key]}
            if runtime[weight_key] is not None and runtime[weight_key] != "0":
                target[weight_key] = "0"
            return target
        live = runtime[live_key]
        if live not in COLORS:
            self.fail(
                "cannot split traffic: the running HAProxy has no live color in {} (entry '{}' is {}). Make a color "
                "live first (this module without weight). Nothing was changed.".format(
                    self.p["map_file"], live_key, repr(live) if live is not None else "missing"
                )
            )
        other = next(c for c in COLORS if c != live)
        canary_weight = weight if self.color == other else BUCKETS - weight
        return {live_key: live, canary_key: other, weight_key: str(canary_weight)}

    def steps(self, runtime, target):
        return plan_steps(runtime, target, self.keys())

    # -- flip -------------------------------------------------------------------------------------------------

    def set_entry(self, key, value):
        if value is None:
            del_map_key(self.sock, self.p["map_file"], key)
        else:
            set_map_value(self.sock, self.p["map_file"], key, value)

    def undo(self, done, runtime):
        """Set back, last first, the entries ``done`` changed; returns the errors."""
        errors = []
        for key in reversed(list(dict.fromkeys(k for k, _v in done))):
            try:
                self.set_entry(key, runtime[key])
            except HAProxyError as exc:
                errors.append(f"{key}: {exc}")
        return errors

    def restore_file(self, text):
        if text is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.p["map_file"])
        else:
            write_atomic(self.p["map_file"], text)

    def fail(self, msg):
        self.result.pop("diff", None)
        self.module.fail_json(msg=msg, **self.result)

    def confirm(self, wanted_color, key=None):
        """Count consecutive frontend answers from ``wanted_color`` (with sticky ``key`` when given)."""
        wanted = self.p["confirm_requests"]
        url = self.p["frontend_url"].rstrip("/") + (self.p["confirm_path"] or self.p["health_path"])
        headers = {self.p["sticky_header"]: key} if key else None
        deadline = time.monotonic() + self.p["confirm_timeout"]
        streak = 0
        last = "no request sent"
        while streak < wanted:
            try:
                status, answer_headers, _dummy = http_get(url, timeout=self.p["health_timeout"], headers=headers)
                answered_by = answer_headers.get("x-sovereign-color")
                last = "{} answered {} from color {}".format(
                    url + (f" (key {key})" if key else ""), status, answered_by or "(no X-Sovereign-Color header)"
                )
                ok = status == 200 and answered_by == wanted_color
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

    def confirm_all(self, target):
        """[(color, key or None)] to confirm after the change; (count, last, color) of the first that failed."""
        live_key, canary_key, weight_key = self.keys()
        weight = parse_weight(target[weight_key])
        live, canary = target[live_key], target[canary_key]
        if canary not in COLORS or canary == live or weight == 0:
            probes = [(live, None)]
        elif weight >= BUCKETS:
            probes = [(canary, None)]
        else:
            probes = [(canary, key_in_range(0, weight)), (live, key_in_range(weight, BUCKETS))]
        total = 0
        for color, key in probes:
            count, last = self.confirm(color, key)
            total += count
            if count < self.p["confirm_requests"]:
                return total, last, color
        return total, "", None

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

    def gate(self, color, runtime_changes):
        """Refuse a color whose share grows when it is unhealthy; warn when one already serving is."""
        problem = self.check_direct_health(color)
        status = server_status(self.sock, color)
        if runtime_changes:
            if problem:
                self.fail(
                    f"refusing to {self.verb()} {color}: its direct health check failed: {problem}. Nothing was "
                    f"changed; fix the {color} runtime and retry."
                )
            if not server_is_usable(status):
                self.fail(
                    "refusing to {} {}: HAProxy reports server {}/{} as '{}' (its own check on {} "
                    "fails or the server is disabled). Nothing was changed; see 'show stat' on {}.".format(
                        self.verb(),
                        color,
                        backend_name(color),
                        server_name(color),
                        status,
                        self.p["health_path"],
                        self.p["admin_socket"],
                    )
                )
        elif problem:
            self.module.warn(f"{color} already takes traffic but its direct health check failed: {problem}")
        elif not server_is_usable(status):
            self.module.warn(f"{color} already takes traffic but HAProxy reports its server as '{status}'")
        return status

    def verb(self):
        return "switch to" if self.p["weight"] is None else "send more traffic to"

    # -- main -------------------------------------------------------------------------------------------------

    def run(self):
        module = self.module
        p = self.p
        map_file = p["map_file"]
        live_key, canary_key, weight_key = self.keys()
        is_split = p["weight"] is not None

        runtime = self.runtime_state()
        file_text = read_text(map_file)
        file_state = {k: (map_value(file_text, k) if file_text is not None else None) for k in self.keys()}
        runtime_color = runtime[live_key]
        self.result["previous_color"] = runtime_color
        self.result["file_color"] = file_state[live_key]
        before = self.shares_of(runtime)
        self.result["previous_weights"] = before

        target = self.target_state(runtime)
        after = self.shares_of(target)
        self.result.update(
            live_color=target[live_key],
            canary_color=target[canary_key],
            weight=parse_weight(target[weight_key]) if target[canary_key] != target[live_key] else 0,
            weights=after,
        )
        for key in self.keys():
            wanted = target[key] if target[key] is not None else runtime[key]
            if file_state[key] != runtime[key]:
                module.warn(
                    "HAProxy routes {} {} (runtime map) but {} says {}: converging both to {}.".format(
                        "to" if key == live_key else f"by {key}",
                        runtime[key] or "(no entry)",
                        map_file,
                        file_state[key] or ("(no entry)" if file_text is not None else "(missing file)"),
                        wanted or "(no entry)",
                    )
                )

        new_text = file_text
        for key in self.keys():
            if target[key] is not None and (file_state[key] != target[key] or key == live_key):
                new_text = render_map(new_text, key, target[key])
        steps = self.steps(runtime, target)
        file_changes = file_text != new_text
        runtime_changes = bool(steps)
        self.result["diff"] = dict(
            before=file_text or "", after=new_text, before_header=map_file, after_header=map_file
        )

        # Health is a hard gate for every color whose share grows; a color that keeps its share is only warned about.
        growing = [c for c in COLORS if after[c] > before[c]]
        watched = growing or ([self.color] if after.get(self.color) else [c for c in COLORS if after[c] > 0])
        statuses = {}
        for color in watched:
            statuses[color] = self.gate(color, color in growing)
        self.result["target_status"] = statuses.get(self.color) or (statuses and next(iter(statuses.values()))) or None

        if not runtime_changes and not file_changes:
            self.result.pop("diff")
            module.exit_json(**self.result)

        self.result["changed"] = True
        if module.check_mode:
            module.exit_json(**self.result)

        done = []
        try:
            for key, value in steps:
                self.set_entry(key, value)
                done.append((key, value))
        except HAProxyError as exc:
            errors = self.undo(done, runtime)
            self.result["changed"] = False
            self.fail(
                "HAProxy refused a command of the change ({}); {}. Nothing else was changed.".format(
                    exc,
                    "the entries already set were put back" if not errors else "PUT BACK FAILED: " + "; ".join(errors),
                )
            )
        if runtime_changes:
            self.result["switched_at"] = utc_now_iso()
        try:
            if file_changes:
                write_atomic(map_file, new_text)
        except OSError as exc:
            note = "nothing was changed in HAProxy"
            if runtime_changes:
                errors = self.undo(done, runtime)
                self.result["switched_at"] = None
                note = "HAProxy was set back" + (" (PUT BACK FAILED: " + "; ".join(errors) + ")" if errors else "")
            self.result["changed"] = False
            self.fail(f"could not write {map_file} ({exc}); {note}. Check that its directory exists and is writable.")

        if not runtime_changes:
            module.exit_json(**self.result)

        if p["confirm_requests"] > 0:
            count, last, failed_color = self.confirm_all(target)
            self.result["confirmed_requests"] = count
            if failed_color is not None:
                errors = self.undo(done, runtime)
                if errors:
                    rollback_note = "and COULD NOT set HAProxy back ({})".format("; ".join(errors))
                else:
                    rollback_note = "set HAProxy back to {}".format(
                        ", ".join(f"{c} {v}%" for c, v in sorted(before.items()))
                    )
                    self.result.update(changed=False, switched_at=None, weights=before)
                    if not is_split:
                        self.result["color"] = runtime_color
                try:
                    if file_changes:
                        self.restore_file(file_text)
                        rollback_note += f"; restored {map_file}"
                except OSError as exc:
                    rollback_note += f"; could not restore {map_file} ({exc})"
                self.fail(
                    "{} not confirmed: {} of {} consecutive requests through {} were answered by {} within {}s "
                    "(last: {}); {}. Check frontend_url and that haproxy.cfg routes by the map entries.".format(
                        f"switch to {self.color}" if not is_split else f"split {self.color} {p['weight']}%",
                        count,
                        p["confirm_requests"],
                        p["frontend_url"],
                        failed_color,
                        p["confirm_timeout"],
                        last,
                        rollback_note,
                    )
                )

        drained_all, seconds_all = True, 0.0
        for old in [c for c in COLORS if before[c] > 0 and after[c] == 0]:
            drained, seconds, left = self.drain(old)
            drained_all = drained_all and drained
            seconds_all += seconds
            if not drained and left >= 0:
                timeout = p["drain_timeout"]
                module.warn(
                    f"{old} still had {left} session(s) after drain_timeout={timeout}s; they continue on "
                    f"{old}, which keeps running as a warm standby."
                )
        self.result["drained"] = drained_all
        self.result["drain_seconds"] = round(seconds_all, 3)
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
            weight=dict(type="int"),
            canary_key=dict(type="str", no_log=False),
            weight_key=dict(type="str", no_log=False),
            sticky_header=dict(type="str"),
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
    for name in ("map_key", "canary_key", "weight_key"):
        if any(c.isspace() for c in p[name]) or not p[name]:
            module.fail_json(msg=f"{name} must be one word without spaces, got {p[name]!r}")
    if len({p["map_key"], p["canary_key"], p["weight_key"]}) != 3:
        module.fail_json(msg="map_key, canary_key and weight_key must be three different keys")
    if p["weight"] is not None and not 0 <= p["weight"] <= 100:
        module.fail_json(
            msg="weight must be a percentage between 0 and 100, got {}; nothing was changed".format(p["weight"])
        )
    if not p["frontend_url"].startswith(("http://", "https://")):
        module.fail_json(msg="frontend_url must be an http:// or https:// URL, got {!r}".format(p["frontend_url"]))

    switch = Switch(module)
    lock = (
        NullLock()
        if module.check_mode
        else SwitchLock(
            p["lock_path"],
            timeout=p["lock_timeout"],
            purpose="blue_green_switch to {}{}".format(
                p["color"], "" if p["weight"] is None else " weight {}".format(p["weight"])
            ),
        )
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
