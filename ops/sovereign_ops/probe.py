"""What sovereign-ops runs on each host, read-only: this whole file is sent as `python3 -c SOURCE MODE [FACT]`.

It must stay self-contained (stdlib only, no package imports, Python 3.9+: hosts run Debian's python3) because
nothing of this package or of the collection exists on the host. The controller imports it too: `resolve` and
`DEFAULTS` are the one place that turns the host contract fact into paths and ports, for `status`, `history`
and benchmarks/switch alike.

MODE ``status``: the live color (map file, and HAProxy's own view on the admin socket), each color's model
(its model env file) and readiness (``GET /v2/health/ready`` on its port). MODE ``ledger``: the deploy ledger's
text. MODE ``flags``: the flagd flag file the host contract names (roles/feature_flags), each flag's state,
default variant and fractional rollout. Each prints one JSON object with the resolved ``contract`` (where each
value came from).
"""

import json
import os
import socket
import sys

FACT = "/etc/ansible/facts.d/sovereign.fact"

# The values the roles used before they published the host contract (their defaults); used only for a section the
# fact does not have, and the answer says so. Keep in step with the roles' defaults (tests/unit/ops pins them).
DEFAULTS = {
    "runtime": {
        "config_dir": "/etc/sovereign/runtime",
        "colors": {
            "blue": {"host": "127.0.0.1", "port": 8001},
            "green": {"host": "127.0.0.1", "port": 8002},
        },
    },
    "traffic_switch": {
        "frontend": {"address": "0.0.0.0", "port": 8000},
        "map_file": "/etc/haproxy/sovereign/live.map",
        "map_key": "live",
        "admin_socket": "/run/haproxy/admin.sock",
    },
    "release": {"ledger": "/var/lib/sovereign/deployments.jsonl"},
}


# roles/feature_flags' default file, for a host whose contract has no feature_flags section (said in the answer).
FLAGS_FILE = "/etc/sovereign/flags/flags.json"


def read_fact(path=FACT):
    """(fact dict or None, error or None): None, None when the file does not exist (a host not converged since
    the contract was introduced); an unreadable or non-JSON file is an error, never a silent fallback."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"{path} is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object"
    return data, None


def _local(address):
    # A runtime bound to every address is reached on loopback from the host itself.
    return "127.0.0.1" if address in (None, "", "0.0.0.0", "::") else address


def resolve(fact, path=FACT):
    """Flat paths and ports of a host from its contract fact (a dict, or None when absent). Every value the fact
    does not give takes DEFAULTS and is named in ``defaulted`` (a whole section, or ``section.key``)."""
    fact = fact if isinstance(fact, dict) else {}
    defaulted = []

    def pick(section, key):
        body = fact.get(section)
        if not isinstance(body, dict):
            if section not in defaulted:
                defaulted.append(section)
            return DEFAULTS[section][key]
        if body.get(key) in (None, "", {}):
            defaulted.append(section + "." + key)
            return DEFAULTS[section][key]
        return body[key]

    config_dir = pick("runtime", "config_dir")
    colors = {}
    for color, info in sorted(pick("runtime", "colors").items()):
        info = info if isinstance(info, dict) else {}
        colors[color] = {
            "host": _local(info.get("host")),
            "port": int(info["port"]) if info.get("port") is not None else None,
            "model_env": info.get("model_env") or os.path.join(config_dir, color + ".model.env"),
        }
    frontend = pick("traffic_switch", "frontend")
    frontend = frontend if isinstance(frontend, dict) else {}
    return {
        "source": "fact" if fact else "defaults",
        "path": path,
        "defaulted": defaulted,
        "config_dir": config_dir,
        "colors": colors,
        "frontend_port": int(frontend.get("port") or DEFAULTS["traffic_switch"]["frontend"]["port"]),
        "map_file": pick("traffic_switch", "map_file"),
        "map_key": pick("traffic_switch", "map_key"),
        "admin_socket": pick("traffic_switch", "admin_socket"),
        "ledger": pick("release", "ledger"),
    }


def map_value(text, key):
    """Value of KEY in an HAProxy map file's text; the last line wins, as in HAProxy's lookup. Same reading as the
    collection's module_utils (tests/unit/ops/test_shared_formats.py holds both to one table)."""
    found = None
    for line in (text or "").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        if parts[0] == key:
            found = parts[1].strip() if len(parts) > 1 else ""
    return found


def env_value(raw):
    """One value of a systemd EnvironmentFile line: the forms the collection writes (bare, 'single', "double"
    with \\ escapes). Multi-line values are not needed for the model keys and not handled."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        out, chars = [], iter(raw[1:-1])
        for char in chars:
            if char == "\\":
                nxt = next(chars, "")
                out.append(nxt if nxt in '"\\`$' else "\\" + nxt)
            else:
                out.append(char)
        return "".join(out)
    return raw


def parse_env(text):
    out = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        out[key] = env_value(value)
    return out


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _haproxy_live(paths):
    """The live color as HAProxy holds it (``show map`` on the admin socket); raises OSError when unreachable."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    try:
        sock.connect(paths["admin_socket"])
        sock.sendall(("show map " + paths["map_file"] + "\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split()  # "<ref> <key> <value>"
        if len(parts) >= 3 and parts[1] == paths["map_key"]:
            return parts[2]
    return None


def _health(host, port):
    import urllib.error
    import urllib.request

    netloc = host if ":" not in host else "[" + host + "]"
    url = f"http://{netloc}:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200, "ready"
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        health = (body.get("state") if isinstance(body, dict) else None) or f"HTTP {exc.code}"
        if isinstance(body, dict) and body.get("reason"):
            health += ": " + str(body["reason"])[:80]
        return False, health
    except OSError as exc:
        return False, f"down ({getattr(exc, 'reason', exc)})"


def status(paths):
    out = {"live_file": None, "live_haproxy": None, "colors": {}}
    try:
        out["live_file"] = map_value(_read(paths["map_file"]), paths["map_key"])
    except OSError as exc:
        out["map_error"] = f"{paths['map_file']}: {exc.strerror or exc}"
    try:
        out["live_haproxy"] = _haproxy_live(paths)
    except OSError as exc:
        out["haproxy_error"] = f"{paths['admin_socket']}: {exc.strerror or exc}"
    for color, where in paths["colors"].items():
        info = {"model": None, "version": None, "uri": None, "ready": False, "health": None, "port": where["port"]}
        try:
            env = parse_env(_read(where["model_env"]))
            info["model"] = env.get("SOVEREIGN_RUNTIME_MODEL_NAME")
            info["version"] = env.get("SOVEREIGN_RUNTIME_MODEL_VERSION")
            info["uri"] = env.get("SOVEREIGN_RUNTIME_MODEL_URI")
        except OSError:
            pass  # a color never deployed has no model env file: "no model"
        if where["port"] is None:
            info["health"] = "no port in the host contract"
        else:
            info["ready"], info["health"] = _health(where["host"], where["port"])
        out["colors"][color] = info
    return out


def ledger(paths):
    try:
        return {"ledger_text": _read(paths["ledger"])}
    except FileNotFoundError:
        return {"ledger_text": ""}  # no release yet on this host
    except OSError as exc:
        return {"ledger_text": "", "ledger_error": f"{paths['ledger']}: {exc.strerror or exc}"}


def _rollout(targeting):
    """{variant, percentage, rest} of a targeting that is one two-bucket fractional, else None."""
    fractional = targeting.get("fractional") if isinstance(targeting, dict) and len(targeting) == 1 else None
    buckets = [b for b in fractional if isinstance(b, list)] if isinstance(fractional, list) else []
    if len(buckets) != 2 or any(len(b) != 2 or not isinstance(b[1], (int, float)) for b in buckets):
        return None
    total = buckets[0][1] + buckets[1][1]
    return {"variant": buckets[0][0], "percentage": round(100.0 * buckets[0][1] / total, 2) if total else 0.0,
            "rest": buckets[1][0]}  # fmt: skip


def flags(fact):
    section = fact.get("feature_flags") if isinstance(fact, dict) else None
    path = section.get("file") if isinstance(section, dict) and section.get("file") else None
    out = {"flags_file": path or FLAGS_FILE, "flags_defaulted": path is None, "flags": None}
    try:
        doc = json.loads(_read(out["flags_file"]))
    except FileNotFoundError:
        out["flags_error"] = f"{out['flags_file']}: no flag file (roles/feature_flags writes it)"
        return out
    except (OSError, ValueError) as exc:
        out["flags_error"] = f"{out['flags_file']}: {getattr(exc, 'strerror', None) or exc}"
        return out
    table = doc.get("flags") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        out["flags_error"] = f"{out['flags_file']}: no 'flags' object"
        return out
    out["flags"] = {}
    for key, flag in sorted(table.items()):
        flag = flag if isinstance(flag, dict) else {}
        targeting = flag.get("targeting") or {}
        out["flags"][key] = {
            "state": flag.get("state"),
            "default": flag.get("defaultVariant"),
            "variants": sorted(flag.get("variants") or {}),
            "rollout": _rollout(targeting),
            "targeting": bool(targeting),
        }
    return out


def main(argv):
    mode = argv[1] if len(argv) > 1 else "status"
    fact_path = argv[2] if len(argv) > 2 else FACT
    fact, error = read_fact(fact_path)
    out = {"hostname": socket.gethostname(), "mode": mode}
    if error:
        out["contract_error"] = error
        print(json.dumps(out))
        return 0
    try:
        paths = resolve(fact, fact_path)
    except (AttributeError, TypeError, ValueError) as exc:  # a value of the wrong type: name it, guess nothing
        out["contract_error"] = f"{fact_path} has a value of the wrong type ({exc})"
        print(json.dumps(out))
        return 0
    out["contract"] = paths
    out.update(status(paths) if mode == "status" else flags(fact) if mode == "flags" else ledger(paths))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
