"""A real, throwaway `mlflow server` for tests (sqlite backend, proxied local artifacts, loopback, one worker),
shared by tests/unit/runtime, tests/unit/examples and tests/unit/playbooks (on sys.path through pytest's
`pythonpath` setting in pyproject.toml)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ports import free_port


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    workdir: Path

    @classmethod
    def launch(cls, work: Path) -> MlflowServer:
        """Started, not waited for (it boots in 10-25 s here): call wait_ready() before using it."""
        port = free_port()
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db"]
        cmd += ["--serve-artifacts", "--artifacts-destination", str(work / "artifacts")]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        # The venv's console scripts first; no MLFLOW_* setting of the caller's environment leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        # As the mlflow role runs it (mlflow_job_execution_enabled: false): without the GenAI job runner and its 7
        # huey consumers, each of which imports mlflow (~10 s of CPU per server, 1.3 GB), which no test here uses.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(work / "server.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=work, start_new_session=True)
        return cls(f"http://127.0.0.1:{port}", proc, work)

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
            return resp.status == 200

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.healthy():
                    return
            time.sleep(0.1)
        self.kill()
        raise AssertionError("mlflow server never got healthy:\n" + (self.workdir / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a throwaway registry: no graceful stop needed
        self.proc.wait(10)
