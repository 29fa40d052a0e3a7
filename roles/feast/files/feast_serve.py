"""Runs Feast's CLI (`feast serve --metrics ...`) with its Prometheus metrics server bound to ONE address and port.

Installed by roles/feast as /usr/local/libexec/sovereign/feast-serve (with the venv's python as its shebang);
feast-serve.service runs it. Feast 0.67 has no option for where its metrics server listens: its child process
(feast.metrics._run_metrics_server) builds the server with feast.metrics._make_metrics_httpd(port, app), which
binds "::" (dual stack) or "" on port 8000, i.e. every address of the host. This launcher replaces that one
function with one that binds --metrics-address:--metrics-port, makes multiprocessing fork (so the metrics child
inherits the replacement; a spawned or forkserver child would import Feast afresh), checks the bind once before
Feast starts (a wrong address or a taken port stops the unit with a message instead of a server without metrics),
and then runs Feast's own CLI with the remaining arguments. docs/adr/1630-feast-metrics-on-the-internal-address.md.

Usage: feast-serve --metrics-address ADDRESS --metrics-port PORT -- FEAST-ARGUMENTS...
"""

import argparse
import inspect
import multiprocessing
import socket
import sys
from wsgiref.simple_server import WSGIServer, make_server


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="feast-serve", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--metrics-address", required=True, help="the one address the metrics server binds")
    parser.add_argument("--metrics-port", type=int, required=True, help="its port")
    parser.add_argument("feast_args", nargs=argparse.REMAINDER, help="-- then Feast's CLI arguments")
    args = parser.parse_args(argv)
    if args.feast_args[:1] == ["--"]:
        args.feast_args = args.feast_args[1:]
    if not args.feast_args:
        parser.error("no Feast arguments after --")
    if args.metrics_address in ("", "0.0.0.0", "::", "[::]", "*"):
        parser.error(f"--metrics-address must be one address, not {args.metrics_address!r} (every address)")
    return args


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def check_bind(address: str, port: int) -> None:
    """Bind once and let go: the address is this host's and the port is free (else exit 2, naming both)."""
    with socket.socket(family_of(address), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            sys.exit(f"feast-serve: cannot bind the metrics server to {address}:{port}: {exc.strerror}")


def bind_metrics_to(address: str, port: int) -> None:
    """Replace feast.metrics._make_metrics_httpd so the metrics server listens on address:port only."""
    from feast import metrics

    original = getattr(metrics, "_make_metrics_httpd", None)
    if original is None or list(inspect.signature(original).parameters) != ["port", "app"]:
        sys.exit(
            "feast-serve: this Feast has no feast.metrics._make_metrics_httpd(port, app), which the launcher "
            "replaces to bind the metrics server: update roles/feast/files/feast_serve.py with the Feast pin"
        )

    class Server(WSGIServer):
        address_family = family_of(address)

    def make_bound_httpd(_port, app):
        return make_server(address, port, app, server_class=Server, handler_class=metrics._QuietWSGIRequestHandler)

    metrics._make_metrics_httpd = make_bound_httpd


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    check_bind(args.metrics_address, args.metrics_port)
    multiprocessing.set_start_method("fork", force=True)
    bind_metrics_to(args.metrics_address, args.metrics_port)
    from feast.cli.cli import cli

    return cli.main(args=args.feast_args, prog_name="feast", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
