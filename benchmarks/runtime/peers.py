"""The peers of benchmarks/runtime: how each is installed, started, driven and checked (issue 17, ADR 1720).

A ``Peer`` is one server project (its ``--peers`` name is also its venv's name). Its ``launches`` say how to
start it for one model, in its documented fastest configuration for one core, and which ``Target`` s (a
port, a request, a parser of the answer) the load generator drives. Every peer but sovereign-runtime runs
from its own venv under ``.cache/bench-peers/<name>/``, installed by ``install()`` from the pinned
``requirements/<name>.txt`` beside this file; sovereign-runtime runs from the interpreter that runs the
benchmark (the project's .venv, pinned by requirements/constraints.txt) with runtime/src first on its path.

A peer that cannot be installed, started or that answers wrongly becomes a ``Failure`` with the stage and
the reason, and is reported in the table: never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SERVERS = HERE / "servers"
REQUIREMENTS = HERE / "requirements"
VENVS = ROOT / ".cache" / "bench-peers"
JAVA_PACKAGE = "openjdk-17-jre-headless"

# The batch the batching peers may form on the heavy model, and how long they wait for it. The light model's
# one-row forward (~25 us) is cheaper than any queue hop, so timer-based batchers run without batching there.
MAX_BATCH = 16
HEAVY_WAIT_MS = 2.0


@dataclass
class Failure:
    """A peer (or one of its targets) that is in no result row, and why."""

    peer: str
    stage: str  # install | start | answer | measure
    reason: str
    model: str = ""
    target: str = ""


@dataclass
class Target:
    """One endpoint the load generator drives: a port, the request, and how to read the answer."""

    label: str
    port: int
    path: str
    body: bytes
    parse: Callable[[bytes], list[float]]
    config: str = ""
    batch_metrics: bool = False  # sovereign-runtime: read rows per forward from its /metrics


@dataclass
class Launch:
    """One server process tree to start; ``ready`` is a GET path that answers 200 once it serves ("": the
    first target's request itself is the readiness probe)."""

    name: str
    cmd: list[str]
    ready_port: int
    ready: str
    targets: list[Target]
    config: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    pick_fastest: bool = False  # probe the targets at c=1 and keep only the fastest (mlflow's two formats)
    prepare: Callable[[], None] | None = None  # run before cmd (TorchServe's model archive)


@dataclass
class Ctx:
    """What a peer needs to build its launches for one model."""

    model: str  # light | heavy
    model_dir: Path
    width: int
    python: str  # the peer venv's interpreter (or the benchmark's own, for sovereign)
    work: Path
    port: Callable[[], int]

    @property
    def heavy(self) -> bool:
        return self.model == "heavy"


@dataclass
class Peer:
    name: str
    launches: Callable[[Ctx], list[Launch]]
    venv: bool = True  # False: the benchmark's own interpreter
    needs: tuple[str, ...] = ()  # executables that must be on PATH (java)


# --------------------------------------------------------------------------------------------------
# Request bodies and answer parsers (the same input row for every server)


def row(width: int) -> list[float]:
    return [round(0.01 * (i % 100), 2) for i in range(width)]


def oip_body(width: int) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input__0", "shape": [1, width], "datatype": "FP32", "data": row(width)}]}
    ).encode()


def parse_oip(raw: bytes) -> list[float]:
    return list(_flat(json.loads(raw)["outputs"][0]["data"]))


def _flat(value) -> list[float]:
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [float(value)]


def parse_any(raw: bytes) -> list[float]:
    """The numbers of a JSON answer whatever its envelope ({"output": ...}, {"predictions": ...}, a list)."""
    doc = json.loads(raw)
    while isinstance(doc, dict):
        if "outputs" in doc:  # OIP, or mlflow's {"predictions": ...}
            doc = doc["outputs"][0]["data"] if isinstance(doc["outputs"], list) and doc["outputs"] else doc["outputs"]
        elif len(doc) == 1:
            doc = next(iter(doc.values()))
        else:
            raise ValueError(f"cannot read the numbers of {sorted(doc)}")
    return _flat(doc)


# --------------------------------------------------------------------------------------------------
# The peers


def _sovereign(ctx: Ctx) -> list[Launch]:
    configs = [
        # The defaults are what roles/inference_runtime deploys (delay 1 ms since ADR 1704); "d0" is the old default,
        # kept so a run shows what the batch delay is worth on this machine.
        ("sovereign", [], "README defaults = the role's: batching (max 16, delay 1 ms), validation, metrics; 1 worker"),
        ("sovereign d0", ["--max-batch-delay-ms", "0"], "batch delay 0 (the default before ADR 1704)"),
    ]
    out = []
    for label, extra, config in configs:
        port = ctx.port()
        cmd = [ctx.python, "-m", "sovereign_runtime", "serve", "--model-uri", str(ctx.model_dir), "--model-name", "m"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--torch-threads", "1", *extra]
        env = {"PYTHONPATH": str(ROOT / "runtime" / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        target = Target(label, port, "/v2/models/m/infer", oip_body(ctx.width), parse_oip, config, batch_metrics=True)
        out.append(Launch(label, cmd, port, "/v2/health/ready", [target], config, env=env))
    return out


def _bare(ctx: Ctx) -> list[Launch]:
    port = ctx.port()
    config = "uvicorn + uvloop + httptools, raw ASGI, inline forward, gc.freeze, no access log (servers/bare.py)"
    target = Target("bare (uvicorn raw ASGI)", port, "/v2/models/m/infer", oip_body(ctx.width), parse_oip, config)
    cmd = [ctx.python, str(SERVERS / "bare.py"), str(ctx.model_dir), str(port)]
    return [Launch("bare", cmd, port, "/v2/health/ready", [target], config)]


def _kserve(ctx: Ctx) -> list[Launch]:
    port = ctx.port()
    config = "kserve.ModelServer, OIP v2 REST, 1 worker, gRPC, docs and per-request latency log off"
    target = Target("kserve (OIP v2)", port, "/v2/models/m/infer", oip_body(ctx.width), parse_oip, config)
    cmd = [ctx.python, str(SERVERS / "kserve_server.py")]
    cmd += ["--http_port", str(port), "--grpc_port", str(ctx.port()), "--workers", "1", "--enable_grpc", "false"]
    cmd += ["--enable_docs_url", "false", "--enable_latency_logging", "false", "--log_level", "warning"]
    env = {"BENCH_MODEL_DIR": str(ctx.model_dir)}
    return [Launch("kserve", cmd, port, "/v2/health/ready", [target], config, env=env, cwd=SERVERS)]


def _litserve(ctx: Ctx) -> list[Launch]:
    port = ctx.port()
    batch = ctx.heavy
    config = "LitServer, 1 API server + 1 inference worker on the CPU, fast_queue" + (
        f", batching max {MAX_BATCH} timeout {HEAVY_WAIT_MS:g} ms" if batch else ", no batching"
    )
    body = json.dumps({"input": row(ctx.width)}).encode()
    target = Target("litserve", port, "/predict", body, parse_any, config)
    cmd = [ctx.python, str(SERVERS / "litserve_server.py"), str(ctx.model_dir), str(port)]
    env = {"BENCH_BATCH": str(MAX_BATCH if batch else 1), "BENCH_WAIT_MS": str(HEAVY_WAIT_MS)}
    return [Launch("litserve", cmd, port, "/health", [target], config, env=env)]


def _ray(ctx: Ctx) -> list[Launch]:
    """Two Rays: with direct ingress Serve starts no proxy, so proxy and replica are separate launches."""
    batch = ctx.heavy
    base = (
        "Ray Serve, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, 1 replica (num_cpus 1), max_ongoing_requests 64, local "
        "1-CPU Ray, no dashboard, access log off"
        + (f", @serve.batch max {MAX_BATCH} wait {HEAVY_WAIT_MS:g} ms" if batch else ", no batching")
    )
    body = json.dumps({"input": [row(ctx.width)]}).encode()
    out = []
    for direct in (False, True):
        port, grpc = ctx.port(), ctx.port()
        label = "ray serve (replica)" if direct else "ray serve (proxy)"
        config = base + ("; straight to the replica (direct ingress)" if direct else "; through the Serve proxy")
        env = {
            "BENCH_BATCH": str(MAX_BATCH if batch else 1),
            "BENCH_WAIT_MS": str(HEAVY_WAIT_MS),
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if direct else "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 1),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(ctx.work / f"ray-{port}"),
        }
        # with direct ingress the (idle) proxy still binds its own port: never the replica's
        proxy = ctx.port() if direct else port
        cmd = [ctx.python, str(SERVERS / "ray_server.py"), str(ctx.model_dir), str(proxy)]
        target = Target(label, port, "/", body, parse_any, config)
        out.append(Launch(label, cmd, port, "", [target], config, env=env, cwd=SERVERS))
    return out


def _bentoml(ctx: Ctx) -> list[Launch]:
    out = []
    for batching in (False, True):
        port = ctx.port()
        label = "bentoml (adaptive batching)" if batching else "bentoml"
        config = "bentoml serve, 1 worker, sync API, access log off" + (
            f", adaptive batching max {MAX_BATCH}, max_latency 1000 ms" if batching else ", no batching"
        )
        body = json.dumps({"x": [row(ctx.width)]}).encode()
        target = Target(label, port, "/predict", body, parse_any, config)
        cmd = [ctx.python, "-m", "bentoml", "serve", "bentoml_service:Model", "--host", "127.0.0.1"]
        cmd += ["--port", str(port)]
        env = {"BENCH_MODEL_DIR": str(ctx.model_dir), "BENCH_BATCH": "1" if batching else "0"}
        env["BENTOML_HOME"] = str(ctx.work / f"bentoml-{port}")
        env["BENTOML_DO_NOT_TRACK"] = "True"
        out.append(Launch(label, cmd, port, "/readyz", [target], config, env=env, cwd=SERVERS))
    return out


def _pytriton(ctx: Ctx) -> list[Launch]:
    port = ctx.port()
    batch = ctx.heavy
    config = "PyTriton (Triton server in the wheel), OIP v2 REST, 1 model instance" + (
        f", dynamic batching max {MAX_BATCH} queue delay {HEAVY_WAIT_MS:g} ms"
        if batch
        else f", dynamic batcher max {MAX_BATCH} with queue delay 0 (groups only what is queued, never waits)"
    )
    target = Target("pytriton (OIP v2)", port, "/v2/models/m/infer", oip_body(ctx.width), parse_oip, config)
    cmd = [ctx.python, str(SERVERS / "pytriton_server.py"), str(ctx.model_dir), str(port), str(ctx.port())]
    cmd.append(str(ctx.port()))
    env = {"BENCH_BATCH": str(MAX_BATCH if batch else 0), "BENCH_WAIT_MS": str(HEAVY_WAIT_MS)}
    env["PYTRITON_HOME"] = str(ctx.work / f"pytriton-{port}")
    # Triton's Python-backend stub loads libpython3.X.so by name: without this it finds the system's (Debian's
    # 3.11.2, whose RLock lacks _recursion_count, which PyTriton's model proxy calls), not the venv's own build
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = libdir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
    return [Launch("pytriton", cmd, port, "/v2/health/ready", [target], config, env=env, cwd=SERVERS)]


def _torchserve(ctx: Ctx) -> list[Launch]:
    port, mgmt, metrics = ctx.port(), ctx.port(), ctx.port()
    batch = ctx.heavy
    store = ctx.work / f"torchserve-{port}"
    bindir = Path(ctx.python).parent
    config = "TorchServe, 1 worker, netty threads 1, system metrics off" + (
        f", batchSize {MAX_BATCH} maxBatchDelay {HEAVY_WAIT_MS:g} ms" if batch else ", no batching"
    )
    models = {"m": {"1.0": {"defaultVersion": True, "marName": "m.mar", "minWorkers": 1, "maxWorkers": 1,
                            "batchSize": MAX_BATCH if batch else 1, "maxBatchDelay": int(HEAVY_WAIT_MS),
                            "responseTimeout": 120}}}  # fmt: skip
    properties = "\n".join(
        [
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{mgmt}",
            f"metrics_address=http://127.0.0.1:{metrics}",
            f"model_store={store}",
            "load_models=m.mar",
            f"models={json.dumps(models)}",
            "default_workers_per_model=1",
            "number_of_netty_threads=1",
            "netty_client_threads=1",
            "job_queue_size=1000",
            "disable_system_metrics=true",
            "disable_token_authorization=true",
            "enable_model_api=false",
            "install_py_dep_per_model=false",
            "async_logging=true",
            "",
        ]
    )

    def prepare() -> None:
        store.mkdir(parents=True, exist_ok=True)
        (store / "config.properties").write_text(properties)
        (store / "log4j2.xml").write_text(LOG4J_QUIET)
        subprocess.run(
            [str(bindir / "torch-model-archiver"), "--model-name", "m", "--version", "1.0", "--handler",
             str(SERVERS / "torchserve_handler.py"), "--extra-files", str(SERVERS / "common.py"),
             "--export-path", str(store), "--force"],
            check=True, capture_output=True, env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"},
        )  # fmt: skip

    body = json.dumps({"input": row(ctx.width)}).encode()
    target = Target("torchserve", port, "/predictions/m", body, parse_any, config)
    cmd = [str(bindir / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(store)]
    cmd += ["--ts-config", str(store / "config.properties"), "--disable-token-auth"]
    cmd += ["--log-config", str(store / "log4j2.xml")]
    env = {"BENCH_MODEL_DIR": str(ctx.model_dir), "LOG_LOCATION": str(store / "logs"), "TS_DISABLE_TOKEN_AUTH": "true"}
    env["METRICS_LOCATION"] = str(store / "logs")
    return [Launch("torchserve", cmd, port, "/ping", [target], config, env=env, cwd=store, prepare=prepare)]


LOG4J_QUIET = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders><Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d %m%n"/></Console></Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="STDOUT"/></Root></Loggers>
</Configuration>
"""


def _mlflow(ctx: Ctx) -> list[Launch]:
    port = ctx.port()
    config = "mlflow models serve --env-manager local, 1 uvicorn worker (its default); the faster JSON format"
    r = row(ctx.width)
    bodies = {
        "inputs": json.dumps({"inputs": [r]}).encode(),
        "dataframe_split": json.dumps({"dataframe_split": {"columns": list(range(ctx.width)), "data": [r]}}).encode(),
    }
    targets = [Target(f"mlflow ({k})", port, "/invocations", b, parse_any, config) for k, b in bodies.items()]
    cmd = [ctx.python, "-m", "mlflow", "models", "serve", "-m", str(ctx.model_dir), "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    return [Launch("mlflow", cmd, port, "/ping", targets, config, env=env, pick_fastest=True)]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("sovereign", _sovereign, venv=False),
        Peer("bare", _bare),
        Peer("kserve", _kserve),
        Peer("litserve", _litserve),
        Peer("ray", _ray),
        Peer("bentoml", _bentoml),
        Peer("pytriton", _pytriton),
        Peer("torchserve", _torchserve, needs=("java",)),
        Peer("mlflow", _mlflow),
    )
}


def select(spec: str | None) -> list[str]:
    """The peers of ``--peers a,b`` in registry order; sovereign is always in (every ratio is to it)."""
    if not spec:
        return list(PEERS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; known: {', '.join(PEERS)}")
    wanted = {"sovereign", *names}
    return [n for n in PEERS if n in wanted]


# --------------------------------------------------------------------------------------------------
# Installing


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def _stamp(name: str) -> str:
    return hashlib.sha256((REQUIREMENTS / f"{name}.txt").read_bytes() + sys.version.encode()).hexdigest()


def pins(name: str) -> list[str]:
    """The requirement lines of a peer's pin file."""
    lines = (REQUIREMENTS / f"{name}.txt").read_text().splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def torch_source() -> list[str]:
    """Where the CPU torch wheel comes from: as scripts/bootstrap.sh does (a local wheel dir, else the CPU index)."""
    links = os.environ.get("TORCH_FIND_LINKS", "/opt/wheels")
    if any(Path(links).glob("torch-*.whl")):
        return ["--find-links", links]
    return ["--extra-index-url", os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")]


def install(name: str, log: Callable[[str], None] = print) -> Failure | None:
    """Create/refresh the peer's venv from its pins (pip's cache is reused). None when ready, else the failure."""
    peer = PEERS[name]
    for exe in peer.needs:
        if not shutil.which(exe):
            hint = f" (`bench.py --setup` apt-installs {JAVA_PACKAGE})" if exe == "java" else ""
            return Failure(name, "install", f"`{exe}` not found on PATH{hint}")
    if not peer.venv:
        return None
    root = VENVS / name
    stamp = root / ".bench-stamp"
    if stamp.is_file() and stamp.read_text() == _stamp(name) and venv_python(name).exists():
        return None
    root.parent.mkdir(parents=True, exist_ok=True)
    logfile = VENVS / f"{name}.install.log"
    log(f"# installing {name} into {root.relative_to(ROOT)} ({', '.join(pins(name))}); log {logfile.relative_to(ROOT)}")
    with open(logfile, "wb") as out:
        steps = [
            [sys.executable, "-m", "venv", str(root)],
            [str(venv_python(name)), "-m", "pip", "install", "-q", *torch_source(), "-r",
             str(REQUIREMENTS / f"{name}.txt")],
        ]  # fmt: skip
        for step in steps:
            rc = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                return Failure(name, "install", f"`{' '.join(step[-3:])}` exited {rc}: {_last_error(logfile)}")
    stamp.write_text(_stamp(name))
    return None


def _last_error(logfile: Path) -> str:
    lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR") or "rror:" in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def ensure_java(log: Callable[[str], None] = print) -> str:
    """TorchServe's frontend is Java: apt-install the headless JRE when it is missing (only from --setup)."""
    if shutil.which("java"):
        return "java: present"
    log(f"# TorchServe needs Java: apt-get install {JAVA_PACKAGE}")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", JAVA_PACKAGE]
    rc = subprocess.run(cmd).returncode
    return f"java: apt-get install {JAVA_PACKAGE} exited {rc}"


def versions(name: str) -> dict[str, str]:
    """Installed versions of the peer's pinned distributions (read from its venv)."""
    python = venv_python(name) if PEERS[name].venv else Path(sys.executable)
    if PEERS[name].venv:
        dists = [p.split("==")[0].split("[")[0] for p in pins(name)]
    else:
        dists = ["sovereign-runtime", "torch", "uvicorn", "uvloop", "httptools"]
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    )  # fmt: skip
    try:
        out = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
