"""The release flow end to end: playbooks/deploy.yml and playbooks/rollback.yml against one real host
(sovereign-runtime on CPU with two real TorchScript models behind HAProxy).

Two scenarios share this file: molecule/release runs every test but the fault cases (pytest -m "not fault"),
molecule/release_faults runs only those (-m fault) on its own host, so each fits the time budget.

The playbooks run as real `ansible-playbook` processes against molecule's inventory; the host's state is read
through testinfra's podman backend. Tests run in file order and share the host: bad input and a held lock
first (each must change nothing), then a deploy and a rollback under keep-alive load (0 failed requests out of
at least 20,000), then the fault cases (a green that never starts, a failing smoke test, a green that degrades
after taking traffic). No GPU here: the runtime runs on CPU. Latency thresholds are loosened (stated per test)
because the test machine is small and shared; the checks they gate are still exercised.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

PROJECT = pathlib.Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", pathlib.Path(__file__).resolve().parents[3]))
INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
MODELS = "/var/lib/sovereign/models"
LEDGER = "/var/lib/sovereign/deployments.jsonl"
METRICS = "/var/lib/prometheus/node-exporter/sovereign_deploy.prom"
LOCK = "/var/lib/sovereign/deploy.lock"
MAP = "/etc/haproxy/sovereign/live.map"
LOADGEN = "/usr/local/lib/sovereign-loadgen.py"

# Loosened for a small shared test machine (the production defaults are 50 ms / 100 ms).
FAST = {
    "deploy_smoke_requests": 20,
    "deploy_smoke_max_p99_ms": 1000,
    "deploy_watch_seconds": 8,
    "deploy_watch_max_p99_ms": 1000,
    "deploy_drain_timeout_s": 5,
}


def play(name, extra=None, timeout=600, check=False):
    """Run a playbook of the collection against molecule's inventory; returns (rc, output, seconds)."""
    assert INVENTORY, "MOLECULE_INVENTORY_FILE is not set (run through molecule verify)"
    cmd = [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(PROJECT / "playbooks" / name)] + (["--check"] if check else [])
    if extra:
        cmd += ["-e", json.dumps(extra)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    print(f"--- {' '.join(cmd)} -> rc {proc.returncode} in {seconds:.1f}s\n{out[-6000:]}")
    # The yaml callback wraps long messages: compare with whitespace collapsed.
    return proc.returncode, " ".join(out.replace("\\n", " ").split()), seconds


def live_color(host):
    return host.file(MAP).content_string.split()[-1]


def frontend(host):
    """(color, model_version) answering a real inference through :8000."""
    golden = json.loads(host.file(f"{MODELS}/v1/model.pt.golden.json").content_string)
    body = json.dumps({"inputs": golden["inputs"]})
    out = host.check_output(
        "curl -sS -D /dev/stderr --fail-with-body --max-time 10 -H 'Content-Type: application/json' "
        f"--data '{body}' http://127.0.0.1:8000/v2/models/demo/infer 2>&1"
    )
    headers = [line.split(":", 1) for line in out.splitlines() if ":" in line]
    color = next(value.strip() for name, value in headers if name.lower() == "x-sovereign-color")
    return color, json.loads(out.splitlines()[-1])["model_version"]


def ledger(host):
    f = host.file(LEDGER)
    return [json.loads(line) for line in f.content_string.splitlines() if line.strip()] if f.exists else []


def snapshot(host):
    """Everything a refused deploy must leave alone."""
    return dict(
        map=host.file(MAP).content_string,
        blue_env=host.file("/etc/sovereign/runtime/blue.model.env").content_string,
        green_env=host.file("/etc/sovereign/runtime/green.model.env").content_string,
        green_started=host.check_output(
            "systemctl show -p ActiveEnterTimestampMonotonic --value sovereign-runtime@green"
        ),
        ledger_lines=len(ledger(host)),
        lock=host.file(LOCK).exists,
        frontend=frontend(host),
    )


def set_lock(host, holder, since, ttl):
    info = json.dumps(dict(holder=holder, since=since, ttl=ttl, token="someone-elses", note="by hand"))
    host.check_output(f"mkdir -p {LOCK} && printf '%s\\n' '{info}' > {LOCK}/info.json")


# -- bad input changes nothing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({"color": "purple"}, "color must be one of blue, green", id="color-purple"),
        pytest.param({"color": "blue"}, "blue is already live", id="color-already-live"),
        pytest.param(
            {"color": "green", "model": f"{MODELS}/nope/model.pt"},
            f"the model {MODELS}/nope/model.pt does not exist",
            id="model-path-missing",
        ),
        pytest.param(
            {"color": "green", "model": "models:/demo@champion", "deploy_tracking_uri": "http://127.0.0.1:9"},
            "MLflow at http://127.0.0.1:9 is unreachable",
            id="mlflow-unreachable",
        ),
        pytest.param(
            {"color": "green", "model": "models:/demo@champion"}, "deploy_tracking_uri is empty", id="no-tracking-uri"
        ),
    ],
)
def test_bad_input_changes_nothing(host, extra, expected):
    before = snapshot(host)
    rc, out, _seconds = play("deploy.yml", extra)
    assert rc != 0
    assert expected in out
    assert "Nothing was changed" in out
    assert snapshot(host) == before


def test_deploy_refused_while_the_lock_is_held(host):
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    set_lock(host, "mallory@elsewhere", since, 600)
    try:
        before = snapshot(host)
        rc, out, _seconds = play("deploy.yml", {"color": "green", "model": f"{MODELS}/v2/model.pt", **FAST})
        assert rc != 0
        assert f"is held by mallory@elsewhere since {since}" in out
        assert snapshot(host) == before
        # The refused run must not release someone else's lock.
        assert "mallory@elsewhere" in host.file(f"{LOCK}/info.json").content_string
    finally:
        host.check_output(f"rm -rf {LOCK}")


# -- the registry: a real MLflow server on the controller ----------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite) on the controller with model `demo` v1..v3, alias champion -> 2 (tagged
    with a sha256). Only the controller talks to it: the deploys below run in check mode (resolution only)."""
    exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    if not os.path.exists(exe):
        pytest.skip("mlflow is not installed on the controller")
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{base}/db.sqlite",
            "--default-artifact-root",
            str(base / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        from mlflow import MlflowClient

        client = MlflowClient(url)
        client.create_registered_model("demo")
        experiment = client.create_experiment("release")
        for _version in range(3):
            run = client.create_run(experiment)
            client.create_model_version("demo", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_registered_model_alias("demo", "champion", "2")
        client.set_model_version_tag("demo", "2", "sha256", "ab" * 32)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


@pytest.mark.parametrize(
    ("model", "expected", "ok"),
    [
        pytest.param(
            "models:/demo@champion", f"Deploying demo version 2 (models:/demo/2, sha256 {'ab' * 32})", True, id="alias"
        ),
        pytest.param("models:/demo/latest", "Deploying demo version 3 (models:/demo/3", True, id="latest"),
        pytest.param("models:/demo@nope", "MLflow has no models:/demo@nope", False, id="unknown-alias"),
        pytest.param("models:/demo/9", "MLflow has no models:/demo/9", False, id="unknown-version"),
        pytest.param("models:/other@champion", "MLflow has no models:/other@champion", False, id="unknown-name"),
        pytest.param("models:/demo", "model must be models:/NAME@ALIAS", False, id="malformed"),
    ],
)
def test_registry_model_is_resolved_once_on_the_controller(host, mlflow_server, model, expected, ok):
    before = snapshot(host)
    rc, out, _seconds = play(
        "deploy.yml", {"color": "green", "model": model, "deploy_tracking_uri": mlflow_server}, check=True
    )
    assert (rc == 0) is ok
    assert expected in out
    assert snapshot(host) == before


# -- deploy and rollback under load ---------------------------------------------------------------------------------


def test_deploy_and_rollback_under_load_lose_no_request(host):
    # A stale lock (a killed run from long ago) is broken with a warning naming its holder.
    set_lock(host, "crashed@ci-runner", "2020-01-01T00:00:00Z", 60)
    host.check_output("rm -f /tmp/loadgen.stop /tmp/loadgen.json; systemctl reset-failed sovereign-loadgen || true")
    host.check_output(
        f"systemd-run --unit sovereign-loadgen --collect /usr/bin/python3 {LOADGEN} http://127.0.0.1:8000 demo 4 "
        "20000 400000 420 /tmp/loadgen.stop /tmp/loadgen.json"
    )
    assert frontend(host) == ("blue", "1")

    rc, out, deploy_s = play(
        "deploy.yml", {"color": "green", "model": f"{MODELS}/v2/model.pt", "model_version": "2", **FAST}
    )
    assert rc == 0, out[-3000:]
    assert "breaking a stale fleet deploy lock /var/lib/sovereign/deploy.lock held by crashed@ci-runner" in out
    assert live_color(host) == "green"
    assert frontend(host) == ("green", "2")

    rc, out, rollback_s = play("rollback.yml")
    assert rc == 0, out[-3000:]
    assert live_color(host) == "blue"
    assert frontend(host) == ("blue", "1")
    print(f"deploy.yml {deploy_s:.1f}s, rollback.yml {rollback_s:.1f}s (wall, including ansible-playbook start)")

    host.check_output("touch /tmp/loadgen.stop")
    deadline = time.monotonic() + 420
    while not host.file("/tmp/loadgen.json").exists:
        assert time.monotonic() < deadline, host.run("journalctl -u sovereign-loadgen -n 30 --no-pager").stdout
        time.sleep(2)
    load = json.loads(host.file("/tmp/loadgen.json").content_string)
    print("load:", json.dumps({k: v for k, v in load.items() if k != "p99_by_second"}))
    assert load["failures"] == 0, load["error_samples"]
    assert load["requests"] >= 20000
    assert load["by_color"].get("green", 0) > 0
    assert load["by_color"].get("blue", 0) > 0

    records = ledger(host)
    deploy, rollback = records[-2], records[-1]
    assert deploy["action"] == "deploy"
    assert deploy["result"] == "success"
    assert (deploy["color"], deploy["previous_color"]) == ("green", "blue")
    assert (deploy["model_name"], deploy["model_version"]) == ("demo", "2")
    assert len(deploy["model_sha256"]) == 64
    assert deploy["who"] and deploy["time"] and deploy["host"]
    assert (rollback["action"], rollback["result"], rollback["color"], rollback["previous_color"]) == (
        "rollback",
        "success",
        "blue",
        "green",
    )
    prom = host.file(METRICS)
    assert prom.mode == 0o644
    assert 'sovereign_deploy_live_color{color="blue"} 1.0' in prom.content_string
    assert 'sovereign_deploy_model_info{color="green",model="demo",version="2"} 1.0' in prom.content_string
    assert 'sovereign_deploy_last_success{action="deploy"} 1.0' in prom.content_string
    assert not host.file(LOCK).exists


# -- fault cases ----------------------------------------------------------------------------------------------------


def _assert_blue_kept(host, out, reason):
    assert live_color(host) == "blue"
    assert frontend(host) == ("blue", "1")
    last = ledger(host)[-1]
    assert (last["action"], last["result"], last["color"]) == ("deploy", "failed", "green")
    assert reason in last["reason"]
    assert not host.file(LOCK).exists


@pytest.mark.fault
def test_fault_green_that_never_starts_takes_no_traffic(host):
    rc, out, _seconds = play(
        "deploy.yml",
        {"color": "green", "model": f"{MODELS}/broken/model.pt", "deploy_ready_timeout_s": 20, **FAST},
    )
    assert rc != 0
    assert "green did not become ready" in out
    assert "load_failed" in out  # the unit's journal is shown
    _assert_blue_kept(host, out, "did not become ready")


@pytest.mark.fault
def test_fault_failing_smoke_test_takes_no_traffic(host):
    rc, out, _seconds = play(
        "deploy.yml",
        {
            "color": "green",
            "model": f"{MODELS}/v2/model.pt",
            "model_version": "2",
            "deploy_smoke_golden_file": f"{MODELS}/wrong-golden.json",
            **FAST,
        },
    )
    assert rc != 0
    assert "golden" in out
    _assert_blue_kept(host, out, "smoke test")


@pytest.mark.fault
def test_fault_green_degrading_after_the_switch_is_switched_back(host):
    # Chaos knob (tests only): 150 ms per request. The smoke test limit is raised above it so green is switched
    # to, and the watch window's p99 limit (100 ms) catches it.
    rc, out, _seconds = play(
        "deploy.yml",
        {
            "color": "green",
            "model": f"{MODELS}/v2/model.pt",
            "model_version": "2",
            "deploy_model_extra_env": {"SOVEREIGN_RUNTIME_CHAOS_LATENCY_MS": 150},
            **FAST,
            "deploy_smoke_requests": 5,
            "deploy_smoke_max_p99_ms": 5000,
            "deploy_watch_seconds": 4,
            "deploy_watch_max_p99_ms": 100,
        },
    )
    assert rc != 0
    assert "green degraded after taking traffic" in out
    assert "traffic switched back to blue" in out
    _assert_blue_kept(host, out, "p99")
