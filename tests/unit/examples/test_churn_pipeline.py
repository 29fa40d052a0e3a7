"""The churn example (examples/churn) run for real: `dvc repro` in a throwaway git + DVC repository, training
against a REAL `mlflow server` (sqlite backend, proxied local artifacts, loopback), then the registered model
loaded by the inference runtime through ``models:/churn@candidate``.

Nothing is faked: the pipeline's own files are copied, only params.yaml is made smaller. Every process started
here is killed here. DVC and git are kept away from the machine's configuration and caches (HOME, DVC's global,
system and site cache directories all point into the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from feast_testrepo import RedisServer, apply_and_materialize, feature_store_yaml
from mlflow_testserver import MlflowServer

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "churn"
PIPELINE_FILES = ("dvc.yaml", "params.yaml", "generate.py", "train.py", "feature_repo")
FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_one_year", "contract_two_year",
            "autopay", "num_products", "data_usage_gb"]  # fmt: skip
SMALL = {"data": {"rows": 1500}, "train": {"epochs": 4, "hidden": [16, 8]}}  # seconds, not minutes

try:  # installed in the project venv, or from the checkout
    import sovereign_runtime  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "runtime" / "src"))

from sovereign_runtime.config import Settings  # noqa: E402
from sovereign_runtime.engine import Engine  # noqa: E402
from sovereign_runtime.protocol import TensorSpec  # noqa: E402
from sovereign_runtime.startup import prepare  # noqa: E402

# --------------------------------------------------------------------------------------------------
# A real MLflow server (the pattern of tests/unit/runtime/conftest.py, with the example's own flags)


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Launched, not waited for: the test prepares the repository while the server boots (10-25 s here)."""
    server = MlflowServer.launch(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.kill()


# --------------------------------------------------------------------------------------------------
# A throwaway git + DVC repository holding the example


def isolated_env(base: Path, tracking_uri: str | None = None) -> dict[str, str]:
    """The venv first on PATH (the stages run `python`); git, DVC and MLflow settings only from here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "DVC_", "MLFLOW_"))}
    for name in ("home", "dvc-global", "dvc-system", "dvc-site-cache"):
        (base / name).mkdir(exist_ok=True)
    env.update(
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        HOME=str(base / "home"),
        GIT_CONFIG_NOSYSTEM="1",
        DVC_GLOBAL_CONFIG_DIR=str(base / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(base / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(base / "dvc-site-cache"),
        DVC_NO_ANALYTICS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run(cmd: list[str], repo: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-5000:]}"
    return output


def dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo, env)


def git(repo: Path, env: dict[str, str], *args: str) -> str:
    return run(["git", *args], repo, env).strip()


def set_params(repo: Path, **sections: dict[str, Any]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(base: Path, env: dict[str, str]) -> Path:
    repo = base / "repo"
    repo.mkdir()
    for name in PIPELINE_FILES:
        if (EXAMPLE / name).is_dir():
            shutil.copytree(EXAMPLE / name, repo / name, ignore=shutil.ignore_patterns(".feast", "__pycache__"))
        else:
            shutil.copy2(EXAMPLE / name, repo / name)
    set_params(repo, **SMALL)
    git(repo, env, "init", "-q", "-b", "main")
    git(repo, env, "config", "user.name", "Example Test")
    git(repo, env, "config", "user.email", "example-test@example.invalid")
    dvc(repo, env, "init", "-q")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-q", "-m", "churn example")
    return repo


def lock_md5(repo: Path, stage: str, key: str = "outs") -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage][key] if o["path"] == "data")


# --------------------------------------------------------------------------------------------------


def test_pipeline_trains_logs_registers_and_serves(mlflow_server, tmp_path, monkeypatch):
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    # The runtime passes its tracking URI to MLflow, but MLflow downloads models:/ URIs through the process-wide
    # *registry* URI: MLFLOW_TRACKING_URI (the inference_runtime role sets it on the hosts), unless some code in
    # this process called mlflow.set_tracking_uri() (tests/unit/runtime does, in the same pytest worker), and
    # else sqlite:///mlflow.db in the working directory. So: this server, process-wide, for this test only.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", mlflow_server.url)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.chdir(tmp_path)
    env = isolated_env(tmp_path, mlflow_server.url)
    repo = make_repo(tmp_path, env)
    head = git(repo, env, "rev-parse", "HEAD")
    dvc(repo, env, "repro", "generate")  # while the server boots
    mlflow_server.wait_ready()

    out = dvc(repo, env, "repro")
    assert "Stage 'generate' didn't change, skipping" in out and "Running stage 'train'" in out, out
    record = json.loads((repo / "mlflow_run.json").read_text())
    md5 = lock_md5(repo, "generate")
    assert md5.endswith(".dir") and lock_md5(repo, "train", "deps") == md5 == record["data.md5"]
    assert (record["name"], record["alias"], record["data.rev"]) == ("churn", "candidate", head)

    # The run: params, metrics, data version, lineage files
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    run_ = client.get_run(record["run_id"])
    params, tags, metrics = run_.data.params, run_.data.tags, run_.data.metrics
    assert params["data.seed"] == "20251121" and params["data.rows"] == "1500"
    assert params["train.epochs"] == "4" and params["train.hidden"] == "16,8" and params["model.name"] == "churn"
    assert (params["data.rev"], params["data.md5"]) == (tags["data.rev"], tags["data.md5"]) == (head, md5)
    assert tags["data.path"] == "data" and tags["data.committed"] == "false"  # dvc.lock not committed yet
    assert tags["registered_model"] == f"models:/churn/{record['version']}"
    # the features came through Feast's offline store, in the feature service's order (the runtime's order)
    assert tags["feature_service"] == "churn" and tags["features"] == ",".join(FEATURES)
    assert params["data.as_of"] == "2026-11-01T00:00:00+00:00"
    assert {"train_loss", "test_accuracy", "test_auc", "test_log_loss", "test_churn_rate"} <= metrics.keys()
    assert 0.5 < metrics["test_accuracy"] <= 1 and 0.5 < metrics["test_auc"] <= 1
    assert len(client.get_metric_history(run_.info.run_id, "train_loss")) == 4
    assert json.loads((repo / "metrics.json").read_text())["test_auc"] == pytest.approx(metrics["test_auc"])
    lineage = {f.path for f in client.list_artifacts(run_.info.run_id, "lineage")}
    assert lineage == {"lineage/dvc.lock", "lineage/params.yaml"}

    # The registry: a new version, aliased, carrying the data version and the weights' checksum
    mv = client.get_model_version_by_alias("churn", "candidate")
    assert (mv.version, mv.run_id) == (record["version"], record["run_id"])
    assert (mv.tags["data.rev"], mv.tags["data.md5"], mv.tags["sha256"]) == (head, md5, record["sha256"])

    # What MLflow stored: torch.export with a dynamic batch dimension, the golden pair in extra_files/
    url = mlflow_server.url
    model_dir = Path(download_artifacts(f"models:/churn/{mv.version}", dst_path=str(tmp_path / "model"),
                                        tracking_uri=url, registry_uri=url))  # fmt: skip
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["pytorch"]["extra_files"] == [{"path": "extra_files/golden.json"}]
    program = torch.export.load(str(model_dir / "data" / "model.pt2"))
    user_inputs = program.graph_signature.user_inputs
    (x_shape,) = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    assert not isinstance(x_shape[0], int) and x_shape[1] == 8  # batch: a symbol (torch.SymInt), features: 8

    # The inference runtime: models:/churn@candidate resolved once, golden check passed, serving
    engine = Engine(Settings(model_uri="models:/churn@candidate", tracking_uri=mlflow_server.url, color="green"))
    report = prepare(engine)
    assert report["ok"] and report["golden"] == "model:extra_files/golden.json", report
    engine.set_ready()
    model = engine.model
    assert (model.name, model.version, model.format) == ("churn", mv.version, "mlflow-pt2")
    assert model.inputs == [TensorSpec("input__0", "FP32", (-1, 8))] and model.static_batch is None
    assert model.sha256 == mv.tags["sha256"]
    meta = engine.metadata()
    assert meta["versions"] == [mv.version]
    assert meta["parameters"]["source"] == f"models:/churn/{mv.version} (from models:/churn@candidate)"

    # A prediction equals a direct forward of the example's own nn.Module holding the registered weights
    spec = importlib.util.spec_from_file_location("churn_train", repo / "train.py")
    train_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_mod)
    eager = train_mod.ChurnModel(8, SMALL["train"]["hidden"])
    eager.load_state_dict(program.state_dict)
    test_rows = (repo / "data" / "test.csv").read_text().splitlines()[1:]
    table = torch.tensor([[float(v) for v in line.split(",")] for line in test_rows])
    for rows in (table[5:12, 1:9], table[20:21, 1:9]):  # a batch of 7 (the example had 4) and a batch of 1
        body = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": list(rows.shape),
                            "data": rows.reshape(-1).tolist()}]}  # fmt: skip
        status, raw, _ = asyncio.run(engine.infer(json.dumps(body).encode(), time.perf_counter()))
        assert status == 200, raw
        (output,) = json.loads(raw)["outputs"]
        assert output["name"] == "output__0" and output["shape"] == [len(rows), 1]
        with torch.no_grad():
            expected = eager(rows)
        assert torch.allclose(torch.tensor(output["data"]).reshape(-1, 1), expected, rtol=1e-5, atol=1e-6)

    # Served with its feature service: the example's own definitions applied to a Redis online store and
    # materialized from data/customers.parquet; a request by customer_id gets the same answer as the vector
    serving = repo / "serving_repo"  # beside data/: the definitions' ../data/customers.parquet resolves
    serving.mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        (serving / "feature_store.yaml").write_text(feature_store_yaml("churn", redis, tmp_path / "registry.db"))
        spec = importlib.util.spec_from_file_location("churn_features", repo / "feature_repo" / "features.py")
        definitions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(definitions)
        apply_and_materialize(serving, [definitions.customer, definitions.customers, definitions.churn_features,
                                        definitions.churn])  # fmt: skip
        keyed = Engine(Settings(model_uri="models:/churn@candidate", tracking_uri=mlflow_server.url,
                                feature_service="churn", feast_repo=str(serving)))  # fmt: skip
        report = prepare(keyed)
        assert report["ok"] and report["entity_golden"] == "ok", report  # golden rows by customer_id, via Redis
        keyed.set_ready()
        assert keyed.metadata()["parameters"]["feature_service"]["features"] == FEATURES
        ids = [int(line.split(",")[0]) for line in test_rows[5:12]]
        body = {"inputs": [{"name": "customer_id", "datatype": "INT64", "shape": [len(ids)], "data": ids}]}
        status, raw, _ = asyncio.run(keyed.infer(json.dumps(body).encode(), time.perf_counter()))
        assert status == 200, raw
        with torch.no_grad():
            expected = eager(table[5:12, 1:9])
        (output,) = json.loads(raw)["outputs"]
        assert torch.allclose(torch.tensor(output["data"]).reshape(-1, 1), expected, rtol=1e-5, atol=1e-6)
    finally:
        redis.stop()

    # Re-running without changes does nothing: both stages skipped, no new run, no new version
    lock_before = (repo / "dvc.lock").read_bytes()
    out = dvc(repo, env, "repro")
    assert "Stage 'generate' didn't change, skipping" in out and "Stage 'train' didn't change, skipping" in out, out
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert len(client.search_runs([run_.info.experiment_id])) == 1
    assert [v.version for v in client.search_model_versions("name = 'churn'")] == [mv.version]

    # docs/lineage.md, from data.md5 back to the dataset: the commit that recorded it, and a checkout by md5
    git(repo, env, "add", "dvc.lock", ".gitignore", "metrics.json", "mlflow_run.json")
    git(repo, env, "commit", "-q", "-m", "churn: train")
    assert git(repo, env, "log", "-S", md5, "--format=%H", "--", "dvc.lock") == git(repo, env, "rev-parse", "HEAD")
    (repo / "restore.dvc").write_text(f"outs:\n- md5: {md5}\n  hash: md5\n  path: restored\n")
    dvc(repo, env, "checkout", "restore.dvc")
    for name in ("train.csv", "test.csv"):
        assert (repo / "restored" / name).read_bytes() == (repo / "data" / name).read_bytes()


def test_same_seed_same_data_md5_other_seed_other_md5(tmp_path):
    env = isolated_env(tmp_path)
    repo = make_repo(tmp_path, env)
    dvc(repo, env, "repro", "generate")
    first = lock_md5(repo, "generate")
    assert "didn't change, skipping" in dvc(repo, env, "repro", "generate")

    set_params(repo, data={"seed": 7})
    assert "Running stage 'generate'" in dvc(repo, env, "repro", "generate")
    other = lock_md5(repo, "generate")
    assert other != first

    set_params(repo, data={"seed": 20251121})  # the same seed again, generated again: the same bytes
    assert "Running stage 'generate'" in dvc(repo, env, "repro", "--force", "generate")
    assert lock_md5(repo, "generate") == first
    status = dvc(repo, env, "status", "train")  # and the train stage knows its data changed
    assert "changed deps" in status and "data" in status, status
