"""Operator switches from a flagd flag file (runtime/src/sovereign_runtime/flags.py): real `sovereign-runtime serve`
processes, a real flag file rewritten the way the feature_flag module does (a new file renamed over the old one),
OpenFeature's SDK with flagd's in-process file provider, a real Feast repository on a real Redis for the feature
fetch switch. No double."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import IN, http, infer_body, runtime_command, runtime_env, stop, wait_until
from mlflow_testserver import free_port
from test_features import GOLDEN_KEYS, SERVICE, Repo, keyed_body

pytest.importorskip("openfeature.contrib.provider.flagd")


def flag_file(batching: bool = True, feature_fetch: bool = True) -> dict:
    def switch(on: bool) -> dict:
        return {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on" if on else "off"}

    return {
        "$schema": "https://flagd.dev/schema/v0/flags.json",
        "flags": {"runtime-batching": switch(batching), "runtime-feature-fetch": switch(feature_fetch)},
    }


def write(path: Path, doc: dict | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


def serve(tmp_path: Path, model: Path, flags: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*runtime_command(), "serve"],
        env=runtime_env(
            SOVEREIGN_RUNTIME_MODEL_URI=str(model),
            SOVEREIGN_RUNTIME_MODEL_NAME="mlp",
            SOVEREIGN_RUNTIME_PORT=str(port),
            SOVEREIGN_RUNTIME_COLOR="blue",
            SOVEREIGN_RUNTIME_FLAGS_FILE=str(flags),
            SOVEREIGN_RUNTIME_FLAGS_POLL_MS="100",
            **env,
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", f"{url}/v2/health/ready", timeout=2).status == 200, 120, "ready")
    return proc, url


def events(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / "serve.log").read_text().splitlines()
    return [doc for doc in (json.loads(line) for line in lines if line.startswith("{")) if doc.get("event") == name]


def max_batch(url: str) -> int:
    return http("GET", f"{url}/v2/models/mlp").json()["parameters"]["max_batch_size"]


def test_batching_follows_the_flag_file_without_a_restart_and_survives_a_broken_file(models, tmp_path):
    flags = tmp_path / "flags.json"
    write(flags, flag_file(batching=False))  # started with batching off: never batches until the flag allows
    proc, url = serve(tmp_path, models.mlflow_pt2, flags)
    try:
        assert max_batch(url) == 1
        write(flags, flag_file(batching=True))
        wait_until(lambda: max_batch(url) == 16, 10, "batching on")
        # A file that does not parse keeps the last good switches and says so; the process stays up.
        write(flags, "{not json")
        wait_until(lambda: events(tmp_path, "flags_file_error"), 10, "flags_file_error logged")
        assert max_batch(url) == 16 and proc.poll() is None
        write(flags, flag_file(batching=False))
        wait_until(lambda: max_batch(url) == 1, 10, "batching off")
        x = torch.randn(3, IN)
        resp = http("POST", f"{url}/v2/models/mlp/infer", infer_body(x))
        assert resp.status == 200 and torch.allclose(
            torch.tensor(resp.json()["outputs"][0]["data"]).reshape(3, 2), models.expected(x), atol=1e-6
        )
        assert proc.poll() is None  # the same process throughout: nothing restarted
        seen = [e["batching"] for e in events(tmp_path, "flags_applied")]
        assert seen[0] is False and True in seen and seen[-1] is False, seen
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, models):
    r = Repo(tmp_path_factory.mktemp("feast-flags"), models.golden_x)
    yield r
    r.redis.stop()


def test_feature_fetch_off_answers_keyed_requests_503_naming_the_flag_and_keeps_vectors(models, repo, tmp_path):
    flags = tmp_path / "flags.json"
    write(flags, flag_file(feature_fetch=True))
    proc, url = serve(
        tmp_path,
        models.mlflow_pt2,
        flags,
        SOVEREIGN_RUNTIME_FEATURE_SERVICE=SERVICE,
        SOVEREIGN_RUNTIME_FEAST_REPO=str(repo.path),
    )
    infer = f"{url}/v2/models/mlp/infer"
    try:
        assert http("POST", infer, keyed_body(GOLDEN_KEYS)).status == 200
        write(flags, flag_file(feature_fetch=False))

        def refused() -> bool:
            resp = http("POST", infer, keyed_body(GOLDEN_KEYS))
            return resp.status == 503 and "runtime-feature-fetch" in resp.json()["error"]

        wait_until(refused, 10, "keyed requests refused by the flag")
        assert http("POST", infer, infer_body(torch.randn(1, IN))).status == 200  # vectors still served
        write(flags, flag_file(feature_fetch=True))
        wait_until(lambda: http("POST", infer, keyed_body(GOLDEN_KEYS)).status == 200, 10, "keyed requests back")
        assert proc.poll() is None
    finally:
        stop(proc)
