"""Fixtures for the runtime tests: tiny real torch models on disk (TorchScript, MLflow torch.export, MLflow
pickle), an in-process ASGI client, engines built from them, a real `mlflow server`, real server processes.

Nothing here is a fake: models are real torch modules saved by torch and by mlflow.pytorch.save_model,
the registry is a real MLflow tracking server on loopback with a sqlite backend. What cannot run here
is CUDA (no GPU on this machine): every test runs the CPU path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock
from mlflow_testserver import MlflowServer

ROOT = Path(__file__).resolve().parents[3]
SRC = ROOT / "runtime" / "src"
try:  # installed (pip install -e runtime) or not: the tests run from the checkout either way
    import sovereign_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(SRC))

from sovereign_runtime.app import App  # noqa: E402
from sovereign_runtime.config import Settings  # noqa: E402
from sovereign_runtime.engine import Engine  # noqa: E402
from sovereign_runtime.model import LoadedModel, load  # noqa: E402
from sovereign_runtime.startup import warmup_and_check  # noqa: E402

IN, OUT = 4, 2


def oip(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    dt = {torch.float32: "FP32", torch.int64: "INT64", torch.bool: "BOOL"}[tensor.dtype]
    return {"name": name, "datatype": dt, "shape": list(tensor.shape), "data": tensor.reshape(-1).tolist()}


def infer_body(x: torch.Tensor, name: str = "input__0", **extra: Any) -> bytes:
    return json.dumps({"inputs": [oip(name, x)], **extra}).encode()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 8), torch.nn.ReLU(), torch.nn.Linear(8, OUT)).eval()


@dataclass
class Models:
    root: Path
    module: torch.nn.Module  # the original, to compare against
    golden_x: torch.Tensor
    torchscript: Path  # file, with <file>.golden.json next to it
    mlflow_pt2: Path  # MLflow dir, MLflow's default format (torch.export), signature, golden.json
    mlflow_pickle: Path  # MLflow dir, serialization_format="pickle"
    bad_golden: Path  # MLflow dir whose golden outputs are wrong
    static_batch: Path  # MLflow dir exported from a batch-1 input_example

    def golden(self, x: torch.Tensor | None = None, offset: float = 0.0) -> dict[str, Any]:
        x = self.golden_x if x is None else x
        with torch.no_grad():
            y = self.module(x) + offset
        return {"inputs": [oip("input__0", x)], "outputs": [oip("output__0", y)], "rtol": 1e-5, "atol": 1e-6}

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Models:
    # Under pytest-xdist the workers share one copy (built by whichever gets the lock first).
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "runtime-models"
    module = mlp()
    x = torch.linspace(-1, 1, 3 * IN).reshape(3, IN)
    m = Models(root, module, x, root / "mlp.ts", root / "mlflow_pt2", root / "mlflow_pickle", root / "bad", root / "b1")
    with FileLock(f"{root}.lock"):
        if not (root / "done").exists():
            _build_models(m)
            (root / "done").touch()
    return m


def _build_models(m: Models) -> None:
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow.pytorch
        from mlflow.models import infer_signature

        shutil.rmtree(m.root, ignore_errors=True)
        m.root.mkdir(parents=True)
        module, x = m.module, m.golden_x
        torch.jit.script(module).save(str(m.torchscript))
        Path(f"{m.torchscript}.golden.json").write_text(json.dumps(m.golden()))
        sig = infer_signature(x.numpy(), m.expected(x).numpy())
        save = mlflow.pytorch.save_model
        save(module, str(m.mlflow_pt2), signature=sig, input_example=x.numpy(), pip_requirements=[])
        (m.mlflow_pt2 / "golden.json").write_text(json.dumps(m.golden()))
        save(module, str(m.mlflow_pickle), signature=sig, serialization_format="pickle", pip_requirements=[])
        (m.mlflow_pickle / "golden.json").write_text(json.dumps(m.golden()))
        shutil.copytree(m.mlflow_pt2, m.bad_golden)
        (m.bad_golden / "golden.json").write_text(json.dumps(m.golden(offset=0.5)))
        save(module, str(m.static_batch), input_example=x[:1].numpy(), pip_requirements=[])
        (m.static_batch / "golden.json").write_text(json.dumps(m.golden(x[:1])))


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    """pytest-xdist's worker id ("gw0", ...), or "master" when not distributed (xdist not required)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture(scope="session")
def loaded(models: Models) -> dict[str, LoadedModel]:
    """Each format loaded once; engines attach them (loading a torch.export file takes ~1 s)."""
    return {
        "torchscript": load(str(models.torchscript)),
        "mlflow_pt2": load(str(models.mlflow_pt2), name="mlp"),
        "mlflow_pickle": load(str(models.mlflow_pickle), name="mlp", allow_pickle=True),
        "bad_golden": load(str(models.bad_golden), name="mlp"),
    }


def make_engine(model: LoadedModel, **overrides: Any) -> Engine:
    """An engine serving an already-loaded model, warmed up and golden-checked like the server does it."""
    cfg = Settings(model_uri="(preloaded)", **overrides)
    engine = Engine(cfg)
    engine.attach(model)
    report = warmup_and_check(engine, model.golden)
    if report["ok"]:
        engine.set_ready()
    else:
        engine.set_failed(report["error"])
    engine.golden_report = report
    return engine


class RecordingTransport:
    """A double of uvloop's TCP transport (no socket): records the writes and the close, refuses a write after
    the close, as the protocol classes' wire tests need."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args, **kwargs) -> None:
        pass


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AsgiClient:
    """Drives an ASGI app in-process, exactly as uvicorn would call it (one scope per request)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: list | None = None, chunks: int = 1
    ) -> Response:
        """``chunks`` > 1 sends the body in pieces without a content-length (like chunked encoding)."""
        length = [(b"content-length", str(len(body)).encode())] if chunks == 1 else []
        hdrs = [(b"host", b"test"), *length, *(headers or [])]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": hdrs,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        size = max(1, -(-len(body) // chunks))
        parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # like a connection that stays open
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        assert start["type"] == "http.response.start"
        return Response(start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:]))

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def post(self, path: str, body: bytes) -> Response:
        return await self.request("POST", path, body)


@pytest.fixture
def client_for():
    """client_for(engine) -> AsgiClient; run coroutines with asyncio.run (no pytest-asyncio needed)."""
    return lambda engine: AsgiClient(App(engine))


# --------------------------------------------------------------------------------------------------
# Real processes


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10) -> Response:
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower().encode(): v.encode() for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower().encode(): v.encode() for k, v in err.headers.items()}, err.read())


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if predicate():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def runtime_command() -> list[str]:
    """The installed console script when there is one, else the module from the checkout."""
    script = Path(sys.executable).parent / "sovereign-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sovereign_runtime"]


def runtime_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SOVEREIGN_RUNTIME_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**base, **env}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


_PRESTARTED: list[MlflowServer] = []


@pytest.fixture(scope="session", autouse=True)
def _prestart_mlflow_server(request: pytest.FixtureRequest, tmp_path_factory, worker_id: str) -> Iterator[None]:
    """Without xdist, boot the MLflow server at session start when a selected test needs it: its 10-25 s
    start-up then overlaps the other tests. (Under xdist each worker would boot one: there it stays lazy.)"""
    if worker_id == "master" and any("mlflow_server" in getattr(i, "fixturenames", ()) for i in request.session.items):
        _PRESTARTED.append(MlflowServer.launch(tmp_path_factory.mktemp("mlflow")))
    yield
    while _PRESTARTED:  # booted but never used (the test was skipped or failed early)
        _PRESTARTED.pop().kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = _PRESTARTED.pop() if _PRESTARTED else MlflowServer.launch(tmp_path_factory.mktemp("mlflow"))
    server.wait_ready()
    yield server
    server.kill()
