# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Real services for the release modules' unit tests (no mocks).

* :func:`render_haproxy_cfg`: renders the traffic_switch role's haproxy.cfg.j2 with test values;
* :class:`HAProxy`: a foreground haproxy process on loopback high ports, temp socket, killed at teardown;
* :class:`Backend`: a tiny HTTP/1.1 runtime stand-in (health, slow path, OIP infer) in a thread;
* :func:`run_module`: runs a module's ``main()`` in-process and returns its JSON result.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parents[5] / "roles" / "traffic_switch" / "templates"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

needs_haproxy = pytest.mark.skipif(
    not os.path.exists(HAPROXY), reason="haproxy is not installed (apt-get install haproxy)"
)


@contextlib.contextmanager
def refused_port():
    """A loopback port nobody listens on for as long as the block runs: bound, never listening, so a connect
    is refused at once and no other process can take the port meanwhile (free_port() gives no such promise)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def template_vars(tmp, frontend_port, stats_port, colors, **overrides):
    """Test values for every traffic_switch_* variable haproxy.cfg.j2 uses."""
    values = dict(
        traffic_switch_log_target=None,
        traffic_switch_chroot=None,
        traffic_switch_user=None,
        traffic_switch_group=None,
        traffic_switch_maxconn=256,
        traffic_switch_hard_stop_after="30s",
        traffic_switch_admin_socket=str(tmp / "admin.sock"),
        traffic_switch_admin_socket_mode="660",
        traffic_switch_frontend_bind="127.0.0.1",
        traffic_switch_frontend_port=frontend_port,
        traffic_switch_stats_bind=f"127.0.0.1:{stats_port}",
        traffic_switch_map_file=str(tmp / "live.map"),
        traffic_switch_map_key="live",
        traffic_switch_canary_key="canary",
        traffic_switch_weight_key="weight",
        traffic_switch_sticky_header="X-Sovereign-Key",
        traffic_switch_sticky_cookie="sovereign_key",
        traffic_switch_default_color="blue",
        traffic_switch_colors=colors,
        # What haproxy.cfg.j2 routes to: the role resolves it from the host contract (vars/main.yml).
        _traffic_switch_colors=colors,
        traffic_switch_health_path="/v2/health/ready",
        # Fast checks, so a stopped or failing backend is DOWN within ~0.3 s, but 3 failures in a row as the role's
        # default and the role's 2 s check timeout: with fall 1 and 1 s, one late answer of a starved Python backend
        # on a loaded machine takes a healthy server DOWN (the likely cause, not reproduced, of a 503 seen with two
        # test-fast lanes).
        traffic_switch_check_interval="100ms",
        traffic_switch_check_fall=3,
        traffic_switch_check_rise=1,
        traffic_switch_timeouts=dict(
            connect="2s", client="30s", server="30s", http_request="5s", http_keep_alive="10s", queue="5s", check="2s"
        ),
    )
    values.update(overrides)
    return values


def render_haproxy_cfg(values):
    """Render the role's template the way Ansible's template module does (trim_blocks), strictly."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template("haproxy.cfg.j2").render(**values)


def admin_command(path, cmd, timeout=5.0):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(cmd.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode()
    finally:
        sock.close()


class HAProxy:
    """A foreground haproxy on a rendered config; ``stop()`` ends it (it is also a context manager).

    ``master_worker=True`` runs it like Debian's systemd unit does (``-W``, master-worker), so that
    :meth:`reload` (SIGUSR2 to the master) is the same hitless reload as ``systemctl reload haproxy``.
    """

    def __init__(self, cfg_path, admin_socket, master_worker=False):
        self.cfg_path = str(cfg_path)
        self.admin_socket = str(admin_socket)
        self.master_worker = master_worker
        self.proc = None
        self.log = None

    def check_config(self):
        return subprocess.run([HAPROXY, "-c", "-f", self.cfg_path], capture_output=True, text=True, check=False)

    def worker_pid(self):
        for line in admin_command(self.admin_socket, "show info").splitlines():
            if line.startswith("Pid:"):
                return int(line.split(":", 1)[1])
        return None

    def _wait_socket(self, not_pid=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"haproxy exited: {self.log.read().decode()}")
            try:
                if self.worker_pid() not in (None, not_pid):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        self.log.seek(0)
        raise TimeoutError(
            f"haproxy admin socket {self.admin_socket} did not come up with a worker other than {not_pid}: "
            f"{self.log.read().decode()[-2000:]}"
        )

    def start(self):
        # An anonymous temp file, not a pipe: haproxy must never block on a full stderr pipe.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        args = (
            [HAPROXY, "-W", "-db", "-f", self.cfg_path] if self.master_worker else [HAPROXY, "-db", "-f", self.cfg_path]
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)
        return self._wait_socket()

    def reload(self):
        """Hitless reload (master-worker only): returns once a new worker answers on the admin socket."""
        assert self.master_worker, "reload needs master_worker=True"
        old = self.worker_pid()
        # The master re-executes itself on every reload; a SIGUSR2 that lands while it is doing so is lost,
        # so a reload that did not happen is asked for again.
        for attempt in range(10):
            self.proc.send_signal(signal.SIGUSR2)
            try:
                return self._wait_socket(not_pid=old, timeout=0.5)
            except TimeoutError:
                if attempt == 9:
                    raise
        return self

    def stop(self):
        if self.proc is not None:
            if self.master_worker:
                self.proc.terminate()  # the master stops its workers
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            else:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.admin_socket)

    def restart(self):
        self.stop()
        return self.start()

    def command(self, cmd):
        return admin_command(self.admin_socket, cmd)

    def stat(self, pxname, svname):
        lines = self.command("show stat").splitlines()
        header = lines[0][2:].split(",")
        for line in lines[1:]:
            fields = line.split(",")
            if fields[:2] == [pxname, svname]:
                return dict(zip(header, fields, strict=False))
        return None

    def wait_status(self, color, prefix, timeout=10.0, exact=False):
        """Wait until HAProxy's check status of ``color``'s server starts with ``prefix`` (is it, with ``exact``:
        a server starts as "UP 1/3", up with fall-1 checks to go before it is fully "UP")."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.stat(f"be_{color}", color)["status"]
            if status == prefix or (not exact and status.startswith(prefix)):
                return status
            time.sleep(0.05)
        raise AssertionError(f"server {color} stayed {status!r}, wanted {prefix}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *args):
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms each.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        backend = self.server.backend
        backend.record(self)
        if self.path == "/v2/health/ready":
            if backend.healthy:
                self._send(200, {"ready": True, "color": backend.color})
            else:
                self._send(503, {"ready": False, "error": "model not loaded"})
        elif self.path == "/slow":
            backend.slow_started.set()
            backend.slow_release.wait(30)
            time.sleep(backend.slow_extra)
            backend.slow_done.set()
            self._send(200, {"color": backend.color, "slow": True})
        else:
            self._send(200, {"color": backend.color, "path": self.path})

    def do_POST(self):
        backend = self.server.backend
        backend.record(self)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send(
            200,
            {
                "model_name": "m",
                "outputs": [{"name": "color", "shape": [1], "datatype": "BYTES", "data": [backend.color]}],
            },
        )


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        # HAProxy resets idle keep-alive connections when it is killed: not an error of the code under test.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class Backend:
    """A color's runtime stand-in: GET /v2/health/ready (200 or 503), GET /slow (held until released),
    GET anything else and POST infer answer 200 with the color. ``port`` is bound at construction."""

    def __init__(self, color, healthy=True, port=0, lie_color=None):
        self.color = color
        self.healthy = healthy
        self.requests = []
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()
        self.slow_release.set()
        self.slow_extra = 0.0
        self.slow_done = threading.Event()
        self.lie_color = lie_color
        self.server = _Server(("127.0.0.1", port), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def record(self, handler):
        self.requests.append((handler.command, handler.path))

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.slow_release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class LiarServer(Backend):
    """Answers every request with ``X-Sovereign-Color: <color>`` (a frontend that does not switch)."""

    def __init__(self, color):
        super().__init__(color)

        class Liar(_Handler):
            def do_GET(self):
                self._send(200, {"liar": True}, {"X-Sovereign-Color": color})

        self.server.RequestHandlerClass = Liar


def warnings(result):
    """Warning texts of a module result (ansible-core 2.19 returns structured warning summaries)."""
    texts = []
    for warning in result.get("warnings") or []:
        if isinstance(warning, dict):
            warning = (warning.get("event") or {}).get("msg") or warning.get("msg") or str(warning)
        texts.append(warning)
    return texts


def run_module(main, args, capsys, check_mode=False, diff=False):
    """Run ``main()`` with ``args``; returns the module's JSON result (``failed`` set on failure)."""
    from ansible.module_utils.testing import patch_module_args

    args = dict(args)
    args["_ansible_check_mode"] = check_mode
    args["_ansible_diff"] = diff
    capsys.readouterr()
    with patch_module_args(args), pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    return json.loads(out)


# ---------------------------------------------------------------------------------------------------------------
# A tiny Open Inference Protocol server (model "double": y = 2 * x)
# ---------------------------------------------------------------------------------------------------------------

GOLDEN = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}],
    "outputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [2.0, 4.0, 6.0, 8.0]}],
}


class _OIPHandler(_Handler):
    def do_GET(self):
        server = self.server.oip
        server.record(self)
        if self.path == "/v2/health/ready":
            if server.mode == "not_ready":
                self._send(503, {"error": "weights not loaded"})
            else:
                self._send(200, {"ready": True})
        elif self.path == f"/v2/models/{server.model}":
            meta = {
                "name": server.model,
                "versions": ["7"],
                "platform": "test",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            }
            if server.mode == "metadata_golden_label":  # what a runtime may say instead of the example
                meta["parameters"] = {"golden": "/models/double/golden.json"}
            elif server.mode == "metadata_json_string":
                meta["parameters"] = {"golden": json.dumps(server.golden)}
            elif server.mode != "no_golden_metadata":
                meta["parameters"] = {"golden": server.golden}
            self._send(200, meta)
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self):
        server = self.server.oip
        server.record(self)
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        if self.path != f"/v2/models/{server.model}/infer":
            self._send(404, {"error": "unknown model"})
            return
        mode = server.mode
        if mode == "slow":
            time.sleep(server.slow_seconds)
        if mode == "wrong_status":
            self._send(500, {"error": "CUDA error: out of memory"})
            return
        x = request["inputs"][0]
        y = [2.0 * v for v in x["data"]]
        if mode == "golden_mismatch":
            y[3] = 0.12
        output = {"name": "y", "shape": list(x["shape"]), "datatype": "FP32", "data": y}
        if mode == "nested_data":
            output["data"] = [y]
        if mode == "bad_schema":
            output["data"] = y[:3]
        response = {
            "model_name": server.model if mode != "wrong_model" else "other",
            "model_version": "7",
            "outputs": [output],
        }
        headers = {"Connection": "close"} if mode == "close_each" else None
        self._send(200, response, headers)
        if mode == "close_each":
            self.close_connection = True


class OIPServer(Backend):
    """OIP v2 server for model ``double`` with a switchable ``mode`` (correct, wrong_status, bad_schema,
    golden_mismatch, slow, not_ready, wrong_model, nested_data, close_each, no_golden_metadata,
    metadata_json_string). ``connections`` counts the TCP connections clients opened."""

    def __init__(self, mode="correct", model="double", golden=None, slow_seconds=0.08):
        super().__init__("oip")
        self.mode = mode
        self.model = model
        self.golden = golden or GOLDEN
        self.slow_seconds = slow_seconds
        self.peers = set()
        self.server.RequestHandlerClass = _OIPHandler
        self.server.oip = self

    def record(self, handler):
        super().record(handler)
        self.peers.add(handler.client_address)

    @property
    def connections(self):
        return len(self.peers)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


# ---------------------------------------------------------------------------------------------------------------
# The same model over OIP v2 gRPC: a real grpcio server speaking the runtime's generated messages
# ---------------------------------------------------------------------------------------------------------------

PB2_PATH = pathlib.Path(__file__).resolve().parents[5] / "runtime/src/sovereign_runtime/oip_grpc/oip_v2_pb2.py"


def oip_pb2():
    """The runtime's generated oip_v2_pb2 (protobuf, in the project venv), loaded from its file alone: the
    collection's tests import nothing else of the runtime (no torch in this process, Makefile UNIT_GROUPS). It
    registers its messages in a descriptor pool of its own (docs/adr/1705), so loading it twice is harmless."""
    import importlib.util
    import sys

    name = "_sovereign_oip_v2_pb2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PB2_PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class GRPCOIPServer:
    """``inference.GRPCInferenceService`` for model ``double`` (y = 2 * x, version "7") on a loopback port, with
    a switchable ``mode``: correct, raw (answers in raw_output_contents), server_not_ready, model_not_ready,
    wrong_outputs, wrong_version, wrong_model, unavailable (ModelInfer answers UNAVAILABLE). ``requests``
    holds the ModelInferRequest messages received (parsed by protobuf)."""

    def __init__(self, mode="correct", model="double"):
        import concurrent.futures

        import grpc

        self.grpc = grpc
        self.pb = oip_pb2()
        self.mode = mode
        self.model = model
        self.requests = []
        self.calls = []
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        methods = dict(
            ServerReady=(self.pb.ServerReadyRequest, self.server_ready),
            ModelReady=(self.pb.ModelReadyRequest, self.model_ready),
            ModelInfer=(self.pb.ModelInferRequest, self.model_infer),
        )
        handlers = dict(
            (
                name,
                grpc.unary_unary_rpc_method_handler(
                    fn, request_deserializer=cls.FromString, response_serializer=lambda m: m.SerializeToString()
                ),
            )
            for name, (cls, fn) in methods.items()
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop(None).wait(5)

    def server_ready(self, request, context):
        self.calls.append("ServerReady")
        return self.pb.ServerReadyResponse(ready=self.mode != "server_not_ready")

    def model_ready(self, request, context):
        self.calls.append("ModelReady")
        if request.name != self.model:
            context.abort(self.grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return self.pb.ModelReadyResponse(ready=self.mode != "model_not_ready")

    def model_infer(self, request, context):
        self.calls.append("ModelInfer")
        self.requests.append(request)
        if self.mode == "unavailable":
            context.abort(self.grpc.StatusCode.UNAVAILABLE, "queue full")
        if request.model_name != self.model:
            context.abort(self.grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        x = request.inputs[0]
        y = [2.0 * v for v in x.contents.fp32_contents]
        if self.mode == "wrong_outputs":
            y[3] = 0.12
        response = self.pb.ModelInferResponse(
            model_name=self.model if self.mode != "wrong_model" else "other",
            model_version="8" if self.mode == "wrong_version" else "7",
            id=request.id,
        )
        out = response.outputs.add(name="y", datatype="FP32", shape=list(x.shape))
        if self.mode == "raw":
            import struct

            response.raw_output_contents.append(struct.pack(f"<{len(y)}f", *y))
        else:
            out.contents.fp32_contents.extend(y)
        return response
