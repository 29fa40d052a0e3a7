"""sovereign.mlops Zenoh router helper, run from the venv that holds the pinned eclipse-zenoh wheel.

Subcommands:
  router CONFIG        run a Zenoh router (mode "router") from a JSON5 file until SIGTERM/SIGINT: the
                       same Rust core as zenohd, without zenohd's plugins (no REST); install method `python`
  check-config CONFIG  parse a JSON5 file with Zenoh's own parser (the role's `validate:`)
  health CONFIG        open a client session with CONFIG (endpoints, credentials), ask `@/<zid>/router`;
                       exit 0 and print HEALTHY, or exit 2 and print why not
  exporter CONFIG      serve Prometheus metrics of the router (sessions, links, queryables, up) over HTTP

Managed by sovereign.mlops.zenoh_router; the configuration files are the role's templates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zenoh


def _load(path: str) -> Any:
    if path.endswith((".json5", ".json", ".yaml", ".yml")):
        return zenoh.Config.from_file(path)
    # Zenoh picks the parser by the file's suffix; Ansible's `validate:` copy has none.
    with open(path, encoding="utf-8") as src, tempfile.NamedTemporaryFile("w", suffix=".json5") as tmp:
        tmp.write(src.read())
        tmp.flush()
        return zenoh.Config.from_file(tmp.name)


def _config_value(conf: Any, key: str) -> Any:
    with contextlib.suppress(Exception):
        return json.loads(conf.get_json(key))
    return None


def cmd_router(args: argparse.Namespace) -> int:
    zenoh.init_log_from_env_or("info")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    session = zenoh.open(_load(args.config))
    print(json.dumps({"event": "router_started", "zid": str(session.info.zid())}), flush=True)
    stop.wait()
    session.close()
    print(json.dumps({"event": "router_stopped"}), flush=True)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        conf = _load(args.config)
    except Exception as exc:
        print(f"{args.config}: not a valid Zenoh configuration: {exc}", file=sys.stderr)
        return 1
    mode = _config_value(conf, "mode")
    print(f"{args.config}: valid Zenoh configuration (mode {mode})")
    return 0


def _tcp_reachable(endpoint: str, timeout: float) -> str | None:
    """None when a TCP connection to a tcp/ or tls/ endpoint opens; else the reason."""
    proto, _sep, rest = endpoint.partition("/")
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    host, _sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if proto not in ("tcp", "tls") or not port.isdigit():
        return None  # not checkable here; the session open will tell
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return f"{endpoint}: {exc.strerror or exc}"


def open_session(config: str, timeout: float) -> tuple[Any, str]:
    """A client session from the file, or SystemExit(2) with the reason named."""
    conf = _load(config)
    endpoints = _config_value(conf, "connect/endpoints") or []
    user = _config_value(conf, "transport/auth/usrpwd/user")
    unreachable = [r for r in (_tcp_reachable(e, timeout) for e in endpoints) if r]
    if endpoints and len(unreachable) == len(endpoints):
        raise SystemExit(f"UNHEALTHY: no router reachable: {'; '.join(unreachable)}")
    started = time.monotonic()
    try:
        session = zenoh.open(conf)
    except Exception as exc:
        waited = int((time.monotonic() - started) * 1000)
        who = f"user '{user}'" if user else "no credentials"
        raise SystemExit(
            f"UNHEALTHY: the router accepted TCP on {', '.join(endpoints)} but refused the Zenoh session after "
            f"{waited} ms ({who}): wrong user/password (transport/auth/usrpwd), or a TLS/mTLS mismatch. "
            f"Zenoh said: {exc}"
        ) from None
    return session, ", ".join(endpoints)


def router_info(session: Any, selector: str, timeout: float) -> list[dict]:
    out = []
    for reply in session.get(selector, timeout=timeout):
        if reply.ok is not None:
            with contextlib.suppress(ValueError):
                out.append(json.loads(reply.ok.payload.to_bytes()))
    return out


def cmd_health(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        session, where = open_session(args.config, args.timeout)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        selector = f"@/{args.zid}/router" if args.zid else "@/*/router"
        infos = router_info(session, selector, args.timeout)
        if not infos:
            print(
                f"UNHEALTHY: session open on {where}, but {selector} gave no reply within {args.timeout} s: the "
                "router's admin space is off, or the ACL does not let this user query @/** (monitor users).",
                file=sys.stderr,
            )
            return 2
        own = str(session.info.zid())
        for info in infos:
            sessions = [s for s in info.get("sessions", []) if s.get("peer") != own]
            kinds = {}
            for s in sessions:
                kinds[s.get("whatami", "?")] = kinds.get(s.get("whatami", "?"), 0) + 1
            took = int((time.monotonic() - started) * 1000)
            print(f"HEALTHY router {info.get('zid')} on {where}: sessions {json.dumps(kinds)} ({took} ms)")
        return 0
    finally:
        session.close()


class Exporter:
    """Metrics of one router, read through the admin space at scrape time with a long-lived session."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.session: Any = None
        self.lock = threading.Lock()

    def _session(self) -> Any:
        if self.session is None:
            self.session, _where = open_session(self.args.config, self.args.timeout)
        return self.session

    def collect(self) -> str:
        args = self.args
        started = time.monotonic()
        lines = [
            "# HELP sovereign_zenoh_router_up 1 when the router answered its admin space at this scrape.",
            "# TYPE sovereign_zenoh_router_up gauge",
        ]
        info: dict = {}
        queryables: dict[str, int] = {"service": 0, "host": 0}
        error = ""
        with self.lock:
            try:
                session = self._session()
                zid = args.zid or "*"
                infos = router_info(session, f"@/{zid}/router", args.timeout)
                info = infos[0] if infos else {}
                if info:
                    space = args.infer_key_space.strip("/")
                    sel = f"@/{info.get('zid', zid)}/router/queryable/{space}/**"
                    for reply in session.get(sel, timeout=args.timeout):
                        if reply.ok is None:
                            continue
                        key = str(reply.ok.key_expr).split("/router/queryable/", 1)[-1]
                        rest = key[len(space) :].strip("/")
                        queryables["service" if rest and "/" not in rest else "host"] += 1
                own = str(session.info.zid())
            except SystemExit as exc:
                error = str(exc)
                own = ""
            except Exception as exc:  # a broken session is reopened at the next scrape
                error = f"{type(exc).__name__}: {exc}"
                own = ""
                with contextlib.suppress(Exception):
                    self.session.close()
                self.session = None
        up = 1 if info else 0
        lines.append(f"sovereign_zenoh_router_up {up}")
        if info:
            sessions = [s for s in info.get("sessions", []) if s.get("peer") != own]
            kinds = {"router": 0, "peer": 0, "client": 0}
            links = 0
            for s in sessions:
                kinds[s.get("whatami", "client")] = kinds.get(s.get("whatami", "client"), 0) + 1
                links += len(s.get("links", []))
            lines += [
                "# HELP sovereign_zenoh_router_info The router's ZID and version.",
                "# TYPE sovereign_zenoh_router_info gauge",
                f'sovereign_zenoh_router_info{{zid="{_esc(info.get("zid", ""))}",'
                f'version="{_esc(info.get("version", ""))}"}} 1',
                "# HELP sovereign_zenoh_router_sessions Sessions open on the router, by the remote's kind"
                " (this exporter's own excluded).",
                "# TYPE sovereign_zenoh_router_sessions gauge",
            ]
            lines += [f'sovereign_zenoh_router_sessions{{whatami="{k}"}} {v}' for k, v in sorted(kinds.items())]
            lines += [
                "# HELP sovereign_zenoh_router_links Transport links of those sessions.",
                "# TYPE sovereign_zenoh_router_links gauge",
                f"sovereign_zenoh_router_links {links}",
                "# HELP sovereign_zenoh_router_queryables Queryables the router knows in the inference key space:"
                " kind service = sovereign/infer/<model> (live colors), host = the host-specific keys.",
                "# TYPE sovereign_zenoh_router_queryables gauge",
            ]
            lines += [
                f'sovereign_zenoh_router_queryables{{key_space="{args.infer_key_space}",kind="{k}"}} {v}'
                for k, v in sorted(queryables.items())
            ]
        lines += [
            "# HELP sovereign_zenoh_exporter_scrape_duration_seconds Time this scrape took.",
            "# TYPE sovereign_zenoh_exporter_scrape_duration_seconds gauge",
            f"sovereign_zenoh_exporter_scrape_duration_seconds {time.monotonic() - started:.6f}",
        ]
        if error:
            lines.insert(0, f"# error: {error.replace(chr(10), ' ')}")
        return "\n".join(lines) + "\n"


def _esc(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def cmd_exporter(args: argparse.Namespace) -> int:
    exporter = Exporter(args)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics here")
                return
            body = exporter.collect().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    host, _sep, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(json.dumps({"event": "exporter_started", "listen": args.listen}), flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sovereign-zenoh", description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("router", help="run the router")
    r.add_argument("config")
    r.set_defaults(func=cmd_router)
    c = sub.add_parser("check-config", help="validate a JSON5 configuration")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    for name, func in (("health", cmd_health), ("exporter", cmd_exporter)):
        h = sub.add_parser(name)
        h.add_argument("config", help="client configuration (endpoints, credentials)")
        h.add_argument("--zid", default="", help="the router's ZID (default: any router that answers)")
        h.add_argument("--timeout", type=float, default=2.0)
        h.set_defaults(func=func)
        if name == "exporter":
            h.add_argument("--listen", required=True, help="ADDRESS:PORT of /metrics")
            h.add_argument("--infer-key-space", default="sovereign/infer")
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
