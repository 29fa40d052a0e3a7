"""``serve --workers N``: one supervisor process, N worker processes on the same port (docs/adr/1710).

``--workers 1`` (the default) never comes here: cli.py runs today's single process (server.py) unchanged.

Supervisor (this module's ``supervise``; it never imports torch):

* resolves N: ``--workers 0`` = one per GPU on CUDA (``CUDA_VISIBLE_DEVICES`` if set, else the driver's
  ``/proc/driver/nvidia/gpus``), else one per CPU this process may run on;
* reserves the port (a bound, never listening ``SO_REUSEPORT`` socket: a busy port fails the start at once,
  port 0 becomes a real one) and makes a run directory holding the shared state file;
* starts each worker as ``python -m sovereign_runtime serve <same flags>`` with ``SOVEREIGN_RUNTIME_WORKER_*``
  set (and on CUDA ``CUDA_VISIBLE_DEVICES`` = its one GPU, round robin); a worker that exits is started again
  (0.5 s, doubling to 10 s while it keeps dying within 10 s of its start), its slot reads "gone" meanwhile;
* SIGTERM/SIGINT: passes the signal to every worker (each drains as a single process does: ready 503,
  ``--shutdown-delay-s``, in-flight requests finish), restarts nothing more, exits 0 once all it signalled exited 0
  (else 1). A second signal is passed on too (the workers stop waiting).

Worker (``serve_worker``): today's RuntimeServer on its own ``SO_REUSEPORT`` listener (the kernel spreads new
connections over the workers), plus

* its state (loading/ready/draining/failed) in its slot of the state file; ``/v2/health/ready`` answers 200 only
  while this worker AND every slot says ready, whichever worker the probe reaches;
* a snapshot of its metrics every ``SNAPSHOT_INTERVAL`` s; ``/metrics`` answers the sum over the live workers
  (its own fresh, the others' snapshots), so every series keeps its name and labels (alerts and dashboards
  unchanged), plus ``sovereign_runtime_workers``, ``_workers_ready`` and ``_worker_restarts_total``;
* the Zenoh bridge in worker 0 only (N queryables on one key would answer each query N times);
* experiment records: every worker writes the color's one SQLite database (WAL, busy timeout; the supervisor
  creates it first), ``/v2/experiment`` counts the color's rows from the database and sums every worker's
  pending rows.

The state file: ``SLOT`` bytes per worker: state (u8, offset 0, the worker writes it; the supervisor sets GONE
when it exits), restarts (u32, offset 4, supervisor), pending experiment rows (u32, offset 8, worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .logs import log_event

ENV_INDEX = "SOVEREIGN_RUNTIME_WORKER_INDEX"
ENV_COUNT = "SOVEREIGN_RUNTIME_WORKER_COUNT"
ENV_DIR = "SOVEREIGN_RUNTIME_WORKER_DIR"
STATE_FILE = "workers.state"
SNAPSHOT = "metrics-{}.prom"
SNAPSHOT_INTERVAL = 0.5
SLOT = 16
GONE, LOADING, READY, DRAINING, FAILED = 0, 1, 2, 3, 4
STATE_NAMES = {GONE: "gone", LOADING: "loading", READY: "ready", DRAINING: "draining", FAILED: "failed"}
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"
POLL_S = 0.05
RESTART_MIN_S, RESTART_MAX_S, STABLE_S = 0.5, 10.0, 10.0


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    return ENV_INDEX in (os.environ if environ is None else environ)


# ------------------------------------------------------------------------------------------------- the plan


def visible_gpus(device: str, environ: Mapping[str, str], gpu_dir: str = NVIDIA_GPUS) -> list[str]:
    """The GPUs a worker may be pinned to (CUDA_VISIBLE_DEVICES entries, or driver indices); [] on CPU."""
    if device == "cpu":
        return []
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [part.strip() for part in listed.split(",") if part.strip()]
        if "-1" in ids:  # CUDA stops at the first invalid entry
            ids = ids[: ids.index("-1")]
        return ids
    try:
        return [str(i) for i in range(len(os.listdir(gpu_dir)))]
    except OSError:
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan(workers: int, device: str, environ: Mapping[str, str], gpu_dir: str = NVIDIA_GPUS) -> list[dict[str, str]]:
    """One environment overlay per worker: the worker count and, on CUDA, each worker's single visible GPU."""
    gpus = visible_gpus(device, environ, gpu_dir)
    n = workers or (len(gpus) if gpus else cpu_count())
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {} for i in range(n)]


# ------------------------------------------------------------------------------------------------- shared state


class SharedState:
    """The state file, memory-mapped: one ``SLOT``-byte slot per worker."""

    def __init__(self, directory: str | Path, count: int, create: bool = False) -> None:
        self.path = Path(directory) / STATE_FILE
        self.count = count
        if create:
            self.path.write_bytes(bytes(SLOT * count))
        with open(self.path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), SLOT * count)

    def state(self, i: int) -> int:
        return self.map[i * SLOT]

    def states(self) -> bytes:
        return self.map[0 : SLOT * self.count : SLOT]

    def set_state(self, i: int, state: int) -> None:
        self.map[i * SLOT] = state

    def _u32(self, i: int, offset: int) -> int:
        return struct.unpack_from("<I", self.map, i * SLOT + offset)[0]

    def _set_u32(self, i: int, offset: int, value: int) -> None:
        struct.pack_into("<I", self.map, i * SLOT + offset, max(0, min(value, 0xFFFFFFFF)))

    def restarts(self, i: int) -> int:
        return self._u32(i, 4)

    def add_restart(self, i: int) -> None:
        self._set_u32(i, 4, self.restarts(i) + 1)

    def pending(self, i: int) -> int:
        return self._u32(i, 8)

    def set_pending(self, i: int, value: int) -> None:
        self._set_u32(i, 8, value)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket with SO_REUSEPORT: every worker binds one on the same port."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


# ------------------------------------------------------------------------------------------------- supervisor


class _Child:
    __slots__ = ("code", "drained", "env", "failures", "index", "proc", "restart_at", "signalled", "started")

    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0  # consecutive exits within STABLE_S of the start
        self.restart_at: float | None = 0.0
        self.code: int | None = None
        self.signalled = 0  # signals passed on to this process
        self.drained: int | None = None  # exit status after the stop signal (None: it was not running then)


class Supervisor:
    def __init__(self, cfg: Any, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.argv = list(argv)
        self.environ = dict(os.environ if environ is None else environ)
        self.overlays = plan(cfg.workers, cfg.device, self.environ)
        self.count = len(self.overlays)
        self.stopping = 0  # signals received
        self.children: list[_Child] = []

    def _signal(self, sig: int, frame: Any) -> None:
        self.stopping += 1  # the loop passes it on (a worker being started right now gets it too)

    def run(self) -> int:
        cfg = self.cfg
        try:
            reserved = reuseport_socket(cfg.host, cfg.port)
        except OSError as exc:
            log_event("bind_failed", logging.ERROR, host=cfg.host, port=cfg.port, error=str(exc),
                      fix="free the port or choose another --port")  # fmt: skip
            return 1
        port = reserved.getsockname()[1]
        rundir = Path(tempfile.mkdtemp(prefix="sovereign-runtime-workers-", dir=self.environ.get("RUNTIME_DIRECTORY")))
        try:
            self.state = SharedState(rundir, self.count, create=True)
            _prepare_experiment_db(cfg)
            base = {**self.environ, ENV_COUNT: str(self.count), ENV_DIR: str(rundir)}
            self.children = [_Child(i, {**base, **o, ENV_INDEX: str(i)}) for i, o in enumerate(self.overlays)]
            self.command = [sys.executable, "-m", "sovereign_runtime", *self.argv, "--port", str(port)]
            originals = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
            log_event("supervisor_starting", workers=self.count, host=cfg.host, port=port, run_dir=str(rundir),
                      gpus=[o.get("CUDA_VISIBLE_DEVICES") for o in self.overlays if o] or None)  # fmt: skip
            try:
                code = self._loop(rundir)
            finally:
                for s, handler in originals.items():
                    signal.signal(s, handler)
            log_event("supervisor_stopped", exit_code=code, exit_codes=[c.drained for c in self.children])
            return code
        finally:
            reserved.close()
            shutil.rmtree(rundir, ignore_errors=True)

    def _start(self, child: _Child) -> None:
        self.state.set_state(child.index, LOADING)
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
        child.proc = subprocess.Popen(self.command, env=child.env, process_group=0)
        child.started = time.monotonic()
        child.restart_at = None
        gpu = self.overlays[child.index].get("CUDA_VISIBLE_DEVICES")
        log_event("worker_started", worker=child.index, pid=child.proc.pid, gpu=gpu)

    def _loop(self, rundir: Path) -> int:
        while True:
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                while proc is not None and child.signalled < self.stopping:
                    child.signalled += 1
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                if proc is not None and (code := proc.poll()) is not None:
                    child.proc = None
                    child.code = code
                    self.state.set_state(child.index, GONE)
                    with contextlib.suppress(FileNotFoundError):
                        (rundir / SNAPSHOT.format(child.index)).unlink()
                    if self.stopping:
                        child.drained = code
                        log_event("worker_stopped", worker=child.index, pid=proc.pid, exit_code=code)
                        continue
                    lived = now - child.started
                    child.failures = child.failures + 1 if lived < STABLE_S else 0
                    delay = min(RESTART_MIN_S * 2 ** max(child.failures - 1, 0), RESTART_MAX_S)
                    child.restart_at = now + delay
                    log_event("worker_exited", logging.WARNING, worker=child.index, pid=proc.pid, exit_code=code,
                              lived_s=round(lived, 3), restart_in_s=delay)  # fmt: skip
                due = child.restart_at is not None and now >= child.restart_at
                if child.proc is None and not self.stopping and due:
                    if child.code is not None:
                        self.state.add_restart(child.index)
                    self._start(child)
            if self.stopping and all(c.proc is None for c in self.children):
                return 0 if all(c.drained in (0, None) for c in self.children) else 1
            time.sleep(POLL_S)


def _prepare_experiment_db(cfg: Any) -> None:
    """Create the experiment database (WAL) once, before N workers open it at the same instant."""
    if not getattr(cfg, "experiment_dir", ""):
        return
    from .experiment import ExperimentStore

    store = ExperimentStore(cfg.experiment_dir, cfg.color, lambda: ("", ""))
    try:
        store._open()
    except Exception as exc:  # the workers fail the start with their own message
        log_event("experiment_prepare_failed", logging.WARNING, error=str(exc))
        return
    assert store._db is not None
    store._db.close()


def supervise(cfg: Any, argv: Sequence[str]) -> int | None:
    """Run the supervisor; None when the plan is a single worker (cli.py then serves in this process)."""
    sup = Supervisor(cfg, argv)
    if sup.count == 1:
        return None
    return sup.run()


# ------------------------------------------------------------------------------------------------- worker


def _die_with_parent() -> None:
    """SIGTERM (a drain) when the supervisor dies without passing a signal on (SIGKILL, OOM)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def merge_metrics(texts: Sequence[str], extra: str = "") -> bytes:
    """Sum Prometheus text expositions sample by sample (counters, histograms, additive gauges); the gauges in
    ``_MERGE`` take the min or max instead. ``extra`` (exposition text) is appended as it is."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple], float]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            entry = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            op = _MERGE.get(fam.name)
            samples = entry[2]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = samples.get(key)
                samples[key] = s.value if old is None else (op(old, s.value) if op else old + s.value)

    class _Merged:
        def collect(self) -> list[Metric]:
            out = []
            for name, (kind, doc, samples) in families.items():
                m = Metric(name, doc, kind)
                for (sname, labels), value in samples.items():
                    m.add_sample(sname, dict(labels), value)
                out.append(m)
            return out

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry) + extra.encode()


_MERGE: dict[str, Callable[[float, float], float]] = {
    "sovereign_runtime_ready": min,
    "sovereign_runtime_feature_store_up": min,
    "sovereign_runtime_model_info": max,
    "sovereign_runtime_model_load_seconds": max,
    "sovereign_runtime_warmup_seconds": max,
    "sovereign_runtime_experiment_active": max,
    "sovereign_runtime_experiment_write_error": max,
    "process_start_time_seconds": min,
    "process_max_fds": max,
}


class Worker:
    """Wires one RuntimeServer into the shared state: readiness, metrics, experiment counts."""

    def __init__(self, server: Any, index: int, count: int, directory: str | Path) -> None:
        self.server = server
        self.index = index
        self.count = count
        self.dir = Path(directory)
        self.shared = SharedState(self.dir, count)
        self.snapshot_path = self.dir / SNAPSHOT.format(index)
        self._snapshot_error = ""

    def install(self) -> None:
        from .engine import READY as ENGINE_READY
        from .protocol import dumps

        server, shared, index = self.server, self.shared, self.index
        app, engine = server.app, server.engine
        shared.set_state(index, LOADING)
        for method, state in (("set_ready", READY), ("set_failed", FAILED), ("begin_drain", DRAINING)):
            original = getattr(engine, method)

            def wrapped(*args: Any, _original: Callable = original, _state: int = state) -> None:
                _original(*args)
                shared.set_state(index, _state)

            setattr(engine, method, wrapped)  # the instance's own: server.py calls engine.set_ready() etc.

        own_ready = app._exact["/v2/health/ready"]

        async def ready(send: Callable, method: str) -> None:
            if engine.state == ENGINE_READY:
                states = shared.states()
                waiting = [i for i, s in enumerate(states) if s != READY]
                if waiting:
                    what = ", ".join(f"{i}: {STATE_NAMES.get(states[i], states[i])}" for i in waiting)
                    body = dumps({"ready": False, "state": "workers", "reason": f"workers not ready ({what})",
                                  "workers": self.count, "worker": index})  # fmt: skip
                    await app._reply(send, "ready", 503, body, None, method)
                    return
            await own_ready(send, method)

        async def metrics(send: Callable, method: str) -> None:
            from .app import METRICS_TYPE

            await app._reply(send, "metrics", 200, self.render(), None, method, METRICS_TYPE)

        app._exact["/v2/health/ready"] = ready
        app._exact["/metrics"] = metrics
        on_startup = app.on_startup

        async def startup() -> None:
            if on_startup is not None:
                await on_startup()
            self._tick(asyncio.get_running_loop())

        app.on_startup = startup
        if server.experiments is not None:
            self._share_experiment(server.experiments)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop thread (the metrics are plain ints the loop mutates): write this worker's snapshot."""
        try:
            tmp = self.snapshot_path.with_suffix(".tmp")
            tmp.write_bytes(self.server.engine.metrics.render())
            os.replace(tmp, self.snapshot_path)
            self._snapshot_error = ""
        except Exception as exc:  # a full disk, or a family changing while the loader thread attaches the model
            if str(exc) != self._snapshot_error:
                log_event("metrics_snapshot_failed", logging.WARNING, error=str(exc))
            self._snapshot_error = str(exc)
        finally:
            loop.call_later(SNAPSHOT_INTERVAL, self._tick, loop)

    def render(self) -> bytes:
        texts = [self.server.engine.metrics.render().decode()]
        states = self.shared.states()
        for i in range(self.count):
            if i == self.index or states[i] == GONE:
                continue
            with contextlib.suppress(OSError, UnicodeDecodeError):
                texts.append((self.dir / SNAPSHOT.format(i)).read_bytes().decode())
        ready_workers = sum(1 for s in states if s == READY)
        restarts = sum(self.shared.restarts(i) for i in range(self.count))
        extra = (
            "# HELP sovereign_runtime_workers Worker processes of this server (--workers)\n"
            "# TYPE sovereign_runtime_workers gauge\n"
            f"sovereign_runtime_workers {float(self.count)}\n"
            "# HELP sovereign_runtime_workers_ready Worker processes ready\n"
            "# TYPE sovereign_runtime_workers_ready gauge\n"
            f"sovereign_runtime_workers_ready {float(ready_workers)}\n"
            "# HELP sovereign_runtime_worker_restarts_total Worker processes the supervisor started again\n"
            "# TYPE sovereign_runtime_worker_restarts_total counter\n"
            f"sovereign_runtime_worker_restarts_total {float(restarts)}\n"
        )
        body = merge_metrics(texts, extra)
        # The ready gauge agrees with /v2/health/ready (200 iff this worker and every slot say ready), read from the
        # fresh state, never from the peers' snapshots: one written just before its worker became ready (up to
        # SNAPSHOT_INTERVAL old) would make the min 0.0 while /v2/health/ready already answers 200.
        from .engine import READY as ENGINE_READY

        if self.server.engine.state == ENGINE_READY and ready_workers == self.count:
            return body.replace(b"\nsovereign_runtime_ready 0.0\n", b"\nsovereign_runtime_ready 1.0\n")
        return body.replace(b"\nsovereign_runtime_ready 1.0\n", b"\nsovereign_runtime_ready 0.0\n")

    def _share_experiment(self, store: Any) -> None:
        """The color's requests from the database (every worker writes it); pending rows summed over workers."""
        import sqlite3

        shared, index = self.shared, self.index
        flush, status = store.flush, store.status

        def flush_and_publish() -> None:  # the writer thread, every INTERVAL
            try:
                flush()
            finally:
                shared.set_pending(index, len(store.rows) + len(store.outcomes))

        def shared_status() -> dict[str, Any]:
            doc = status()
            states = shared.states()
            doc["pending"] = (
                len(store.rows)
                + len(store.outcomes)
                + sum(shared.pending(i) for i in range(self.count) if i != index and states[i] != GONE)
            )
            if store.active is not None:
                with contextlib.suppress(sqlite3.Error):
                    db = sqlite3.connect(store.db_path, timeout=1)
                    try:
                        row = db.execute("SELECT count(*) FROM assignments WHERE experiment = ?", (store.active,))
                        doc["requests"] = row.fetchone()[0]
                    finally:
                        db.close()
            doc["workers"] = self.count
            return doc

        store.flush = flush_and_publish
        store.status = shared_status


def serve_worker(cfg: Any, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    index, count, directory = int(env[ENV_INDEX]), int(env[ENV_COUNT]), env[ENV_DIR]
    _die_with_parent()
    if index != 0 and (cfg.zenoh_key_expr or cfg.zenoh_host_key_expr):
        cfg = dataclasses.replace(cfg, zenoh_key_expr="", zenoh_host_key_expr="")
    from .server import RuntimeServer

    server = RuntimeServer(cfg)
    Worker(server, index, count, directory).install()
    sock = reuseport_socket(cfg.host, cfg.port)
    server.run(sockets=[sock])
    log_event("stopped", exit_code=server.exit_code, state=server.engine.state, worker=index)
    return server.exit_code
