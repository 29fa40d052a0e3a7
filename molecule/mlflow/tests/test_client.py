"""Drives the REAL MLflow server in the molecule container with MLflow's own Python client.

Runs on the controller (its .venv has the same pinned mlflow): logs a run with params, metrics and an
artifact, logs and registers a tiny python_function model, sets the `candidate` alias, resolves
`models:/NAME@candidate` and downloads everything back through the server (`--serve-artifacts`:
artifact URIs are `mlflow-artifacts:/...`), comparing checksums. Basic-auth is on in the scenario.
"""

import hashlib
import uuid
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import requests
from mlflow import MlflowClient

ARTIFACTS_ROOT = "/var/lib/sovereign/mlflow/artifacts"


class AddOffset(mlflow.pyfunc.PythonModel):
    """A tiny model: adds the offset stored in its `offset` artifact to every input value."""

    def load_context(self, context):
        self.offset = float(Path(context.artifacts["offset"]).read_text())

    def predict(self, context, model_input, params=None):
        return [float(x) + self.offset for x in model_input["x"]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(mlflow_url, mlflow_credentials):
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    return MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)


@pytest.fixture(scope="module")
def logged(client, tmp_path_factory):
    """One run with params, metrics, an artifact and a registered model with alias `candidate`."""
    tag = uuid.uuid4().hex[:8]
    src = tmp_path_factory.mktemp("src")
    blob = src / "blob.bin"
    blob.write_bytes(uuid.uuid4().bytes * 4096)
    offset = src / "offset.txt"
    offset.write_text("1.5")

    experiment_id = client.create_experiment(f"molecule-verify-{tag}")
    model_name = f"molecule-model-{tag}"
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"lr": 0.01, "layers": 3})
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_artifact(str(blob), artifact_path="data")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=AddOffset(),
            artifacts={"offset": str(offset)},
            # Skip requirement inference (it spawns a subprocess); the model needs nothing else.
            pip_requirements=[f"mlflow=={mlflow.__version__}"],
            registered_model_name=model_name,
        )
    version = info.registered_model_version
    client.set_registered_model_alias(model_name, "candidate", version)
    return {
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "model_name": model_name,
        "version": str(version),
        "model_info": info,
        "blob": blob,
        "offset": offset,
    }


def test_experiment_artifacts_are_proxied(client, logged):
    experiment = client.get_experiment(logged["experiment_id"])
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    run = client.get_run(logged["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")


def test_params_and_metrics_round_trip(client, logged):
    run = client.get_run(logged["run_id"])
    assert run.data.params == {"lr": "0.01", "layers": "3"}
    history = client.get_metric_history(logged["run_id"], "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.9), (1, 0.5), (2, 0.25)]


def test_artifact_downloads_through_the_server_unchanged(client, logged, tmp_path):
    listed = [f.path for f in client.list_artifacts(logged["run_id"], "data")]
    assert listed == ["data/blob.bin"]
    local = Path(client.download_artifacts(logged["run_id"], "data/blob.bin", str(tmp_path)))
    assert _sha256(local) == _sha256(logged["blob"])


def test_artifact_landed_in_the_server_side_destination(host, logged):
    """The server wrote it (proxied), into its local destination, as the mlflow user."""
    path = f"{ARTIFACTS_ROOT}/{logged['experiment_id']}/{logged['run_id']}/artifacts/data/blob.bin"
    f = host.file(path)
    assert f.is_file
    assert f.user == "mlflow"
    assert f.sha256sum == _sha256(logged["blob"])


def test_alias_resolves_to_the_registered_version(client, logged):
    mv = client.get_model_version_by_alias(logged["model_name"], "candidate")
    assert mv.version == logged["version"]
    assert mv.aliases == ["candidate"]


def test_model_downloads_by_alias_with_matching_checksums(logged, tmp_path):
    uri = f"models:/{logged['model_name']}@candidate"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    assert (local / "MLmodel").is_file()
    weights = list(local.rglob("offset.txt"))
    assert len(weights) == 1
    assert _sha256(weights[0]) == _sha256(logged["offset"])


def test_model_loads_and_predicts_by_alias(logged):
    model = mlflow.pyfunc.load_model(f"models:/{logged['model_name']}@candidate")
    assert model.predict({"x": [1.0, 2.0]}) == [2.5, 3.5]


def test_unauthenticated_request_is_rejected(mlflow_url):
    r = requests.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=30)
    assert r.status_code == 401


def test_wrong_password_is_rejected(mlflow_url):
    r = requests.get(
        f"{mlflow_url}/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=("admin", "not-the-password"),
        timeout=30,
    )
    assert r.status_code == 401


def test_health_needs_no_credentials(mlflow_url):
    r = requests.get(f"{mlflow_url}/health", timeout=30)
    assert r.status_code == 200


def test_published_port_is_an_allowed_host(published_url, admin_auth):
    """Through the published port the Host header is 127.0.0.1:15517: the host guard lets it in."""
    r = requests.get(
        f"{published_url}/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=admin_auth,
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_unknown_host_header_is_refused(mlflow_url, admin_auth):
    """MLflow's DNS-rebinding guard stays on: a Host header not in --allowed-hosts is refused."""
    r = requests.get(
        f"{mlflow_url}/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=admin_auth,
        headers={"Host": "attacker.example.com"},
        timeout=30,
    )
    assert r.status_code == 403


def test_prometheus_metrics_exposed(mlflow_url, admin_auth):
    # Make sure at least one request has been counted.
    requests.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search", auth=admin_auth, timeout=30)
    r = requests.get(f"{mlflow_url}/metrics", auth=admin_auth, timeout=30)
    assert r.status_code == 200
    assert "mlflow_http_request_total" in r.text
