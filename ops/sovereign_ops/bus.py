"""The Zenoh bus from the on-call machine: `infer --zenoh` (one inference through the routers) and `bus` (the routers,
their sessions, the queryables in the inference key space), with the inventory's routers and credentials.

From the inventory (literal values or inline vault, as ansible-inventory gives them; no templates):
  sovereign_zenoh_connect          router endpoints reachable from here (default: tcp/<ansible_host>:<zenoh_router_port
                                   or 7447> of each host in zenoh_routers)
  sovereign_zenoh_client_user      default sovereign-client       (infer)
  sovereign_zenoh_client_password
  sovereign_zenoh_monitor_user     default sovereign-monitor      (bus: the admin space)
  sovereign_zenoh_monitor_password
  sovereign_zenoh_<role>_password_file   instead of the password: a file on this machine holding it (the lab)
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from . import inventory

ROUTER_GROUP = "zenoh_routers"
INFER_SPACE = "sovereign/infer"


def _var(inv, name, default=None, vault=None, tool=None):
    """A variable of the inventory (the first host that has it: group_vars/all reach every host)."""
    for host in inv.hosts.values():
        if name in host.vars:
            value = host.vars[name]
            if isinstance(value, dict) and "__ansible_vault" in value:
                value = inventory._decrypt(
                    value["__ansible_vault"],
                    vault or inventory.Vault(),
                    tool or inventory.ansible_tool("ansible-inventory"),
                    host.name,
                    name,
                )
            if isinstance(value, str) and "{{" in value:
                raise inventory.InventoryError(
                    f"{name} is a template ({value!r}) in the inventory; sovereign-ops does not evaluate templates: "
                    "give a literal value or an inline vault string"
                )
            return value
    return default


def endpoints(inv):
    given = _var(inv, "sovereign_zenoh_connect")
    if given:
        return [given] if isinstance(given, str) else list(given)
    routers = [h for h in inv.hosts.values() if ROUTER_GROUP in h.groups]
    if not routers:
        raise inventory.InventoryError(
            f"no host in group {ROUTER_GROUP!r} and no sovereign_zenoh_connect: add the routers to the inventory, or "
            "set sovereign_zenoh_connect to endpoints reachable from here (e.g. [tcp/127.0.0.1:17447])"
        )
    return [f"tcp/{h.address}:{h.vars.get('zenoh_router_port', 7447)}" for h in sorted(routers, key=lambda h: h.name)]


def credentials(inv, role, vault=None):
    user = _var(inv, f"sovereign_zenoh_{role}_user", f"sovereign-{role}")
    password_file = _var(inv, f"sovereign_zenoh_{role}_password_file")
    if password_file:  # the lab: the generated secret's file on this machine
        try:
            return str(user), Path(password_file).expanduser().read_text().strip()
        except OSError as exc:
            raise inventory.InventoryError(
                f"sovereign_zenoh_{role}_password_file {password_file}: {exc.strerror}: run `make lab` (it generates "
                "the lab secrets) or fix the path"
            ) from None
    password = _var(inv, f"sovereign_zenoh_{role}_password", vault=vault)
    if not password:
        raise inventory.InventoryError(
            f"sovereign_zenoh_{role}_password is not in the inventory: set it (vault) to the password of the router "
            f"user {user!r}"
        )
    return str(user), str(password)


def _reachable(endpoint, timeout=2.0):
    proto, _, rest = endpoint.partition("/")
    host, _, port = rest.split("#", 1)[0].rpartition(":")
    if proto not in ("tcp", "tls") or not port.isdigit():
        return True
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_session(eps, user, password, timeout_ms=3000):
    """A client session to the routers, or InventoryError naming why not (unreachable / credentials refused)."""
    try:
        import zenoh
    except ImportError:
        raise inventory.InventoryError(
            "the Zenoh client is not installed here: pip install eclipse-zenoh (pinned in requirements/constraints.txt)"
        ) from None
    conf = zenoh.Config()
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("connect/endpoints", json.dumps(eps))
    conf.insert_json5("connect/timeout_ms", str(timeout_ms))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("transport/auth/usrpwd/user", json.dumps(user))
    conf.insert_json5("transport/auth/usrpwd/password", json.dumps(password))
    try:
        return zenoh.open(conf)
    except Exception as exc:
        up = [e for e in eps if _reachable(e)]
        if not up:
            raise inventory.InventoryError(
                f"no Zenoh router reachable at {', '.join(eps)}: are the routers up (systemctl status "
                "sovereign-zenoh-router), is sovereign_zenoh_connect right?"
            ) from None
        raise inventory.InventoryError(
            f"the router(s) at {', '.join(up)} refused the session for user {user!r}: wrong user/password (check "
            f"the vault value against the router's users), or TLS is on there ({str(exc).splitlines()[0][:120]})"
        ) from None


def _payload(reply):
    raw = reply.payload.to_bytes()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def infer(eps, user, password, key, body, timeout=10.0):
    """[(ok, payload)] of one query on KEY through the routers, and the round trip in ms."""
    session = open_session(eps, user, password)
    try:
        started = time.perf_counter()
        out = []
        for reply in session.get(key, payload=body, timeout=timeout):
            out.append((True, _payload(reply.ok)) if reply.ok is not None else (False, _payload(reply.err)))
        return out, (time.perf_counter() - started) * 1000
    finally:
        session.close()


def listing(eps, user, password, space=INFER_SPACE, timeout=3.0):
    """{'routers': [{zid, locators, sessions: {kind: n}, links}], 'queryables': {key: [declaring zids]}}."""
    session = open_session(eps, user, password)
    try:
        own = str(session.info.zid())
        routers = []
        for reply in session.get("@/*/router", timeout=timeout):
            if reply.ok is None:
                continue
            info = _payload(reply.ok)
            if not isinstance(info, dict):
                continue
            kinds, links = {}, 0
            for s in info.get("sessions", []):
                if s.get("peer") == own:
                    continue
                kinds[s.get("whatami", "?")] = kinds.get(s.get("whatami", "?"), 0) + 1
                links += len(s.get("links", []))
            routers.append(
                {"zid": info.get("zid"), "locators": info.get("locators", []), "sessions": kinds, "links": links}
            )
        queryables = {}
        for r in routers:
            for reply in session.get(f"@/{r['zid']}/router/queryable/{space}/**", timeout=timeout):
                if reply.ok is None:
                    continue
                key = str(reply.ok.key_expr).split("/router/queryable/", 1)[-1]
                who = _payload(reply.ok)
                zids = (who.get("clients", []) + who.get("peers", [])) if isinstance(who, dict) else []
                if zids:
                    queryables.setdefault(key, set()).update(zids)
        return {
            "routers": sorted(routers, key=lambda r: r["zid"] or ""),
            "queryables": {k: sorted(v) for k, v in sorted(queryables.items())},
        }
    finally:
        session.close()


def format_listing(data):
    lines = [f"{'router':34} {'sessions':32} links  locators"]
    for r in data["routers"]:
        sessions = ", ".join(f"{k} {v}" for k, v in sorted(r["sessions"].items())) or "none"
        lines.append(f"{r['zid']:34} {sessions:32} {r['links']:5}  {' '.join(r['locators'])}")
    if not data["routers"]:
        lines.append("(no router answered its admin space: the monitor user may lack the ACL right, or admin is off)")
    lines.append("")
    lines.append(f"queryables in {INFER_SPACE}/**:")
    for key, zids in data["queryables"].items():
        lines.append(f"  {key}  ({len(zids)}: {', '.join(z[:8] for z in zids)})")
    if not data["queryables"]:
        lines.append("  none: no runtime answers inference on the bus (see docs/runbooks/zenoh-router.md)")
    return "\n".join(lines)
