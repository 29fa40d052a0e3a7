"""A real, throwaway Redis and Feast repositories applied and materialized into it, for tests (shared by
tests/unit/runtime and tests/unit/examples, on sys.path through pytest's `pythonpath` setting).

Redis is Debian's `redis-server` binary (scripts/bootstrap.sh installs it), started on a free loopback port
in a temp dir with a password, no persistence, and stopped/started again by the tests that need an outage:
never the system's service. Feast is the real SDK: `apply` into a file registry, `materialize` from a
parquet offline source into that Redis.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_testserver import free_port

PASSWORD = "feast-test-secret"  # a throwaway instance on loopback, for this test session only


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


@dataclass
class RedisServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/bootstrap.sh installs Debian's redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--requirepass", PASSWORD]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"]
        cmd += ["--daemonize", "no", "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                if b"PONG" in s.recv(100):
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.address} did not answer within {timeout}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM and wait: the port is free afterwards (connection refused), data gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def feature_store_yaml(project: str, redis: RedisServer, registry: Path) -> str:
    return (
        f"project: {project}\n"
        "provider: local\n"
        f"registry: {registry}\n"
        "online_store:\n"
        "  type: redis\n"
        f'  connection_string: "{redis.address},password={PASSWORD}"\n'
        "offline_store:\n"
        "  type: dask\n"
        "entity_key_serialization_version: 3\n"
        "auth:\n"
        "  type: no_auth\n"
    )


def apply_and_materialize(repo: Path, definitions: list, start: str = "2000-01-01", end: str | None = None) -> None:
    """`feast apply` of ``definitions`` then `feast materialize` of everything up to ``end`` (now), in-process
    through the SDK (what the CLI does, without a 5-10 s interpreter start per command)."""
    from datetime import UTC, datetime

    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    store.apply(definitions)
    stop = datetime.fromisoformat(end) if end else datetime.now(UTC)
    store.materialize(datetime.fromisoformat(start).replace(tzinfo=UTC), stop)
