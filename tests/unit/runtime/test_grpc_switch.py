"""The traffic switch moves gRPC calls (docs/adr/1705), for real: the traffic_switch role's haproxy.cfg.j2 rendered
with its gRPC frontend, a real haproxy on loopback in front of two real `sovereign-runtime serve --grpc-port`
processes (blue and green), tritonclient and grpcio as clients. A switch is what blue_green_switch does to HAProxy
(`set map` on the admin socket); under a closed-loop gRPC load no call fails, and new calls follow the map."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import IN, http, runtime_command, runtime_env, stop, wait_until
from mlflow_testserver import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "modules" / "release_fixtures"))
from harness import HAProxy, admin_command, needs_haproxy, render_haproxy_cfg, template_vars

triton = pytest.importorskip("tritonclient.grpc")
np = pytest.importorskip("numpy")
from tritonclient.grpc import service_pb2 as tpb  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
procs_by_color: dict[str, subprocess.Popen] = {}  # the colors' processes (the last test drains blue)
pytestmark = needs_haproxy


@pytest.fixture(scope="module")
def colors(models) -> Iterator[dict]:
    spec, procs = {}, []
    try:
        for color in ("blue", "green"):
            port, grpc_port = free_port(), free_port()
            cmd = [*runtime_command(), "serve", "--model-uri", str(models.mlflow_pt2), "--model-name", "mlp"]
            cmd += ["--port", str(port), "--grpc-port", str(grpc_port), "--color", color]
            procs.append(subprocess.Popen(cmd, env=runtime_env(), stderr=subprocess.DEVNULL))
            spec[color] = {"host": "127.0.0.1", "port": port, "grpc_port": grpc_port}
        procs_by_color.update(zip(spec, procs, strict=True))
        for s in spec.values():
            url = f"http://127.0.0.1:{s['port']}/v2/health/ready"
            wait_until(lambda url=url: http("GET", url, timeout=2).status == 200, 90, "ready")
        yield spec
    finally:
        for p in procs:
            stop(p)


@pytest.fixture(scope="module")
def switch(colors, tmp_path_factory) -> Iterator[tuple[HAProxy, str, dict]]:
    tmp = tmp_path_factory.mktemp("grpc-switch")
    grpc_port = free_port()
    values = template_vars(
        tmp, free_port(), free_port(), colors, _traffic_switch_grpc=True, traffic_switch_grpc_frontend_port=grpc_port
    )
    (tmp / "live.map").write_text("live blue\n")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(render_haproxy_cfg(values))
    proxy = HAProxy(cfg, values["traffic_switch_admin_socket"])
    checked = proxy.check_config()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    proxy.start()
    try:
        target = f"127.0.0.1:{grpc_port}"
        client = triton.InferenceServerClient(target)
        wait_until(lambda: _ready(client), 30, "the gRPC frontend")
        yield proxy, target, values
    finally:
        proxy.stop()


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:
        return False


def _payload(x: torch.Tensor) -> bytes:
    req = tpb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input__0", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.numpy().astype("<f4").tobytes())
    return req.SerializeToString()


def test_tritonclient_through_the_switch(switch, models):
    _, target, _ = switch
    x = torch.randn(3, IN)
    inp = triton.InferInput("input__0", [3, IN], "FP32")
    inp.set_data_from_numpy(x.numpy())
    got = triton.InferenceServerClient(target).infer("mlp", [inp]).as_numpy("output__0")
    assert np.allclose(got, models.expected(x).numpy(), atol=1e-6)


class Load:
    """4 closed-loop callers, each on its own channel (one HTTP/2 connection, kept across switches); the color of
    every answer (HAProxy's X-Sovereign-Color response header), every failure."""

    def __init__(self, target: str) -> None:
        self.payload = _payload(torch.ones(1, IN))
        self.target = target
        self.seen: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.caller) for _ in range(4)]

    def caller(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            call = channel.unary_unary(METHOD)
            while not self.done.is_set():
                try:
                    _, state = call.with_call(self.payload, timeout=30)
                    self.seen.append((time.monotonic(), dict(state.initial_metadata()).get("x-sovereign-color", "?")))
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")

    def after(self, t0: float, color: str) -> int:
        return sum(1 for t, c in list(self.seen) if t > t0 and c == color)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)


def set_live(values: dict, color: str) -> float:
    """What blue_green_switch does to HAProxy: the live entry of the map, in memory, through the admin socket."""
    out = admin_command(
        values["traffic_switch_admin_socket"], f"set map {values['traffic_switch_map_file']} live {color}"
    )
    assert out.strip() == "", out
    return time.monotonic()


def test_a_switch_under_grpc_load_fails_no_call(switch):
    _, target, values = switch
    with Load(target) as load:
        wait_until(lambda: load.after(0, "blue") >= 50, 30, "calls to blue")
        switched = set_live(values, "green")
        wait_until(lambda: load.after(switched, "green") >= 50, 30, "calls to green after the switch")
        back = set_live(values, "blue")
        wait_until(lambda: load.after(back, "blue") >= 50, 30, "calls to blue after switching back")
    assert load.failures == [], load.failures[:5]
    assert {c for _, c in load.seen[-20:]} == {"blue"}  # new calls on the same connections follow the map
    assert {c for _, c in load.seen} == {"blue", "green"}


def test_the_old_color_drained_after_a_switch_fails_no_call(switch):
    """The release flow's order: switch, then SIGTERM the old color (it refuses new calls once its listener closes,
    HAProxy's idle HTTP/2 connections to it get a GOAWAY): the clients of the switch see no error."""
    _, target, values = switch
    blue = procs_by_color["blue"]
    with Load(target) as load:
        wait_until(lambda: load.after(0, "blue") >= 20, 30, "calls to blue")
        switched = set_live(values, "green")
        wait_until(lambda: load.after(switched, "green") >= 20, 30, "calls to green")
        blue.send_signal(signal.SIGTERM)
        assert blue.wait(30) == 0
        gone = time.monotonic()
        wait_until(lambda: load.after(gone, "green") >= 50, 30, "calls to green after blue stopped")
    assert load.failures == [], load.failures[:5]
