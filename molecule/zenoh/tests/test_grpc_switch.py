"""OIP v2 over gRPC through the traffic switch (docs/adr/1705), on the scenario that already converges a real runtime
(both colors) and HAProxy on one host: tritonclient[grpc] on the controller calls ModelInfer through HAProxy's gRPC
frontend (HTTP/2) at the host's address, and a switch made the way blue_green_switch makes it (HAProxy's admin
socket `set map`, then the map file) under a small closed-loop gRPC load moves new calls to the other color with no
failed call. No double: the runtimes, HAProxy and the client are the real ones."""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import podman_net

INSTANCE = "molecule-zenoh-inf"
CONTRACT = "/etc/ansible/facts.d/sovereign.fact"
GOLDEN = "/var/lib/sovereign/models/demo/model.pt.golden.json"
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def contract(h):
    return json.loads(h.file(CONTRACT).content_string)


@pytest.fixture(scope="module")
def switch(host):
    c = contract(host)
    port = c["traffic_switch"]["grpc_frontend"]["port"]
    assert port, c["traffic_switch"]
    return f"{podman_net.container_ip(INSTANCE)}:{port}", c


@pytest.fixture(scope="module")
def golden(host):
    g = json.loads(host.file(GOLDEN).content_string)
    (x,) = g["inputs"]
    (y,) = g["outputs"]
    return np.array(x["data"], dtype=np.float32).reshape(x["shape"]), np.array(y["data"], dtype=np.float32).reshape(
        y["shape"]
    )


def set_live(host, c, color):
    """What blue_green_switch does: HAProxy's map in memory (admin socket), then the map file (atomically)."""
    ts = c["traffic_switch"]
    script = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        " s.sendall(f'set map {sys.argv[2]} {sys.argv[3]} {sys.argv[4]}\\n'.encode()); print(s.recv(4096).decode())"
    )
    argv = ["python3", "-c", script, ts["admin_socket"], ts["map_file"], ts["map_key"], color]
    out = host.check_output(" ".join(shlex.quote(a) for a in argv))
    assert out.strip() == "", out  # HAProxy answers nothing on success
    tmp = f"{ts['map_file']}.tmp"
    line = f"{ts['map_key']} {color}"
    host.check_output(
        f"printf '{line}\\n' > {tmp} && chgrp haproxy {tmp} && chmod 0640 {tmp} && mv {tmp} {ts['map_file']}"
    )


def live_color(host, c) -> str:
    ts = c["traffic_switch"]
    for line in host.file(ts["map_file"]).content_string.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == ts["map_key"]:
            return fields[1]
    return ts["default_color"]


def test_each_color_and_the_switch_serve_grpc(host, switch, golden):
    target, c = switch
    x, y = golden
    colors = c["runtime"]["colors"]
    for where in [target] + [f"{colors[k]['host']}:{colors[k]['grpc_port']}" for k in ("blue", "green")]:
        client = triton.InferenceServerClient(where)
        assert client.is_server_ready() and client.is_model_ready("demo"), where
        inp = triton.InferInput(x_name(client), list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("demo", [inp]).as_numpy(y_name(client))
        assert np.allclose(got, y, rtol=1e-4, atol=1e-5), where
    metrics = host.check_output(f"curl -sf http://{colors['blue']['host']}:{colors['blue']['port']}/metrics")
    assert 'endpoint="grpc_infer"' in metrics


def x_name(client) -> str:
    return client.get_model_metadata("demo", as_json=True)["inputs"][0]["name"]


def y_name(client) -> str:
    return client.get_model_metadata("demo", as_json=True)["outputs"][0]["name"]


def test_a_switch_under_grpc_load_fails_no_call(host, switch, golden):
    """4 closed-loop callers through the switch; the live color flips to the other and back while they call. Every
    call succeeds, and the answering color (HAProxy's X-Sovereign-Color response header) follows the map."""
    target, c = switch
    x = golden[0]
    request = service_pb2.ModelInferRequest(model_name="demo")
    request.inputs.add(name=x_name(triton.InferenceServerClient(target)), datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    payload = request.SerializeToString()
    start = live_color(host, c)
    other = "green" if start == "blue" else "blue"
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    failures: list[str] = []

    def caller() -> None:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(METHOD)
            while not stop.is_set():
                try:
                    state = call.with_call(payload, timeout=30)[1]
                    meta = dict(state.initial_metadata())
                    seen.append((time.monotonic(), meta.get("x-sovereign-color", "?")))
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=caller) for _caller in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(seen) >= 50, "calls before the switch")
        set_live(host, c, other)
        switched = time.monotonic()
        _wait(lambda: sum(1 for t, col in seen if t > switched and col == other) >= 50, f"calls answered by {other}")
        set_live(host, c, start)
        back = time.monotonic()
        _wait(lambda: sum(1 for t, col in seen if t > back and col == start) >= 50, f"calls answered by {start}")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        set_live(host, c, start)
    assert failures == [], failures[:5]
    # New calls on the callers' open connections follow the map: the last ones all come from the restored color.
    assert {col for _t, col in seen[-20:]} == {start}
    assert {col for _t, col in seen} == {"blue", "green"}


def _wait(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
