"""The release flow end to end: playbooks/deploy.yml and playbooks/rollback.yml against one real host
(sovereign-runtime on CPU with two real TorchScript models behind HAProxy).

molecule/release runs this file after the progressive delivery tests of test_progressive*.py, on the same host and
converge (conftest.py); they leave blue live with v1 and no split, where this file starts. The deploy under load
and each fault case start from that state (the blue_live_v1 fixture of conftest.py, which restores it when a test
runs alone or out of order); the fault cases are marked fault (``-m fault`` runs only them).

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
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
from playbook import PROJECT, command, play

MODELS = "/var/lib/sovereign/models"
LEDGER = "/var/lib/sovereign/deployments.jsonl"
METRICS = "/var/lib/prometheus/node-exporter/sovereign_deploy.prom"
LOCK = "/var/lib/sovereign/deploy.lock"
FACT = "/etc/ansible/facts.d/sovereign.fact"
LOADGEN = "/usr/local/lib/sovereign-loadgen.py"
# The lineage a deploy records (roles/release/tasks/resolve_*.yml): a git commit and a DVC directory md5.
DATA_REV = "1" * 40
DATA_MD5 = "d41d8cd98f00b204e9800998ecf8427e.dir"

# Loosened for a small shared test machine (the production defaults are 50 ms / 100 ms).
FAST = {
    "deploy_smoke_requests": 20,
    "deploy_smoke_max_p99_ms": 1000,
    "deploy_watch_seconds": 8,
    "deploy_watch_max_p99_ms": 1000,
    "deploy_drain_timeout_s": 5,
}


_WHERE = {}


def where(host):
    """The host's paths and ports as its contract fact says (inference_runtime and traffic_switch publish it; the
    converge sets non-default ones), the roles' old defaults only where the fact is absent. Read once: converged
    values do not change during the tests."""
    if host.backend.name not in _WHERE:
        f = host.file(FACT)
        fact = json.loads(f.content_string) if f.exists else {}
        runtime, switch = fact.get("runtime", {}), fact.get("traffic_switch", {})
        colors = runtime.get("colors", {})
        config_dir = runtime.get("config_dir", "/etc/sovereign/runtime")
        _WHERE[host.backend.name] = dict(
            fact=fact,
            map_file=switch.get("map_file", "/etc/haproxy/sovereign/live.map"),
            admin_socket=switch.get("admin_socket", "/run/haproxy/admin.sock"),
            ports={c: int(colors.get(c, {}).get("port", d)) for c, d in (("blue", 8001), ("green", 8002))},
            hosts={c: colors.get(c, {}).get("host", "127.0.0.1") for c in ("blue", "green")},
            model_env={c: colors.get(c, {}).get("model_env", f"{config_dir}/{c}.model.env") for c in ("blue", "green")},
        )
    return _WHERE[host.backend.name]


def live_color(host):
    """The live color in the map file: its live key's value (after a canary or an experiment the file also holds the
    split's canary and weight keys)."""
    key = where(host)["fact"].get("traffic_switch", {}).get("map_key", "live")
    lines = host.file(where(host)["map_file"]).content_string.splitlines()
    return next(line.split()[1] for line in lines if line.split()[:1] == [key] and len(line.split()) > 1)


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


def grpc_infer_answered(host, color):
    """ModelInfer calls the color answered 200, from its own /metrics: here only the smoke test calls it over gRPC
    (the load is HTTP), so this counts the smoke test's gRPC calls since the color last started."""
    w = where(host)
    out = host.check_output(f"curl -sf --max-time 10 http://{w['hosts'][color]}:{w['ports'][color]}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in out.splitlines()
        if line.startswith("sovereign_runtime_requests_total{")
        and 'endpoint="grpc_infer"' in line
        and 'code="200"' in line
    )


def ledger(host):
    f = host.file(LEDGER)
    return [json.loads(line) for line in f.content_string.splitlines() if line.strip()] if f.exists else []


def start_load(host, name, min_requests):
    """The load generator as a transient unit sovereign-NAME: 4 keep-alive clients through :8000, until
    stop_load (and at least MIN_REQUESTS) or 420 s."""
    host.check_output(f"rm -f /tmp/{name}.stop /tmp/{name}.json; systemctl reset-failed sovereign-{name} || true")
    host.check_output(
        f"systemd-run --unit sovereign-{name} --collect /usr/bin/python3 {LOADGEN} http://127.0.0.1:8000 demo 4 "
        f"{min_requests} 400000 420 /tmp/{name}.stop /tmp/{name}.json"
    )


def stop_load(host, name):
    """Stops the load generator NAME and returns its report (requests, failures, by_color, ...)."""
    host.check_output(f"touch /tmp/{name}.stop")
    deadline = time.monotonic() + 420
    while not host.file(f"/tmp/{name}.json").exists:
        assert time.monotonic() < deadline, host.run(f"journalctl -u sovereign-{name} -n 30 --no-pager").stdout
        time.sleep(2)
    return json.loads(host.file(f"/tmp/{name}.json").content_string)


def snapshot(host):
    """Everything a refused deploy must leave alone."""
    return dict(
        map=host.file(where(host)["map_file"]).content_string,
        blue_env=host.file(where(host)["model_env"]["blue"]).content_string,
        green_env=host.file(where(host)["model_env"]["green"]).content_string,
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


# -- the host contract ----------------------------------------------------------------------------------------------


def test_the_host_contract_names_non_default_ports_and_map_file(host):
    """The converge gives the roles non-default ports and map file (molecule/release/converge.yml); every deploy,
    rollback and sovereign-ops call below finds them only through the host contract fact."""
    w = where(host)
    assert w["fact"], f"{FACT} is missing: nothing published the host contract"
    assert w["ports"] == {"blue": 8101, "green": 8102}, w
    assert w["map_file"] == "/etc/haproxy/sovereign/release-test.map", w
    for color, port in w["ports"].items():
        live = host.run(f"curl -sf http://{w['hosts'][color]}:{port}/v2/health/live")
        assert live.rc == 0, f"{color} does not answer on {port}"
    assert not host.file("/etc/haproxy/sovereign/live.map").exists


# -- bad input changes nothing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # The role's argument specs refuse it before any task runs (their message, not ours).
        pytest.param({"color": "purple"}, "value of color must be one of: blue, green, got: purple", id="color-purple"),
        pytest.param({"color": "green", "deploy_watch_seconds": "soon"}, "deploy_watch_seconds", id="not-a-number"),
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
    # The argument specs' own refusals (before any task runs) do not say it; the snapshot proves it for every case.
    if "Validation of arguments failed" not in out:
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


def _dead_pid():
    """The PID of a process of this controller that has exited (a dead ansible-playbook's, as far as a lock knows)."""
    proc = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.mark.parametrize(
    ("holder", "extra", "ok", "expected"),
    [
        # This pytest process stands for a live ansible-playbook of this controller: still refused.
        pytest.param("live", {}, False, "is held by alice@ctl since", id="live-holder-on-this-controller-refuses"),
        pytest.param("dead", {}, True, "that ansible-playbook is no longer running", id="dead-holder-is-broken"),
        pytest.param(
            "elsewhere", {}, False, "if you are sure a run on another controller is dead", id="other-controller-refuses"
        ),
        pytest.param(
            "elsewhere",
            {"deploy_break_lock": True},
            True,
            "as asked (force / deploy_break_lock)",
            id="other-controller-with-deploy_break_lock",
        ),
    ],
)
def test_lock_liveness_on_this_controller(host, holder, extra, ok, expected):
    """The fleet lock's liveness check (docs/adr/0502) with the real playbook; check mode, so a lock that would be
    broken is left in place and nothing is deployed."""
    import socket

    pid = {"live": os.getpid(), "dead": _dead_pid(), "elsewhere": os.getpid()}[holder]
    started = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, check=False)
    info = dict(
        holder="alice@ctl",
        since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ttl=1800,
        token="someone-elses",
        note="deploy green",
        controller="some-other-controller" if holder == "elsewhere" else socket.gethostname(),
        controller_pid=pid,
        controller_pid_started=" ".join(started.stdout.split()) if holder != "dead" else "Thu Jan  1 00:00:00 2026",
    )
    host.check_output(f"mkdir -p {LOCK} && printf '%s\\n' '{json.dumps(info)}' > {LOCK}/info.json")
    try:
        before = snapshot(host)
        rc, out, _seconds = play(
            "deploy.yml", {"color": "green", "model": f"{MODELS}/v2/model.pt", **FAST, **extra}, check=True
        )
        assert (rc == 0) is ok, out[-3000:]
        assert expected in out
        assert f"(ansible-playbook pid {pid} on {info['controller']})" in out
        assert snapshot(host) == before
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
        client.set_model_version_tag("demo", "2", "data.rev", DATA_REV)
        client.set_model_version_tag("demo", "2", "data.md5", DATA_MD5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # on the loaded test machine its server outlasted 30 s of SIGTERM (ERROR)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.parametrize(
    ("model", "expected", "ok"),
    [
        pytest.param(
            "models:/demo@champion", f"Deploying demo version 2 (models:/demo/2, sha256 {'ab' * 32})", True, id="alias"
        ),
        pytest.param("models:/demo@champion", f"Trained on data rev {DATA_REV}", True, id="alias-data-rev"),
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


@pytest.mark.usefixtures("blue_live_v1")
def test_deploy_and_rollback_under_load_lose_no_request(host):
    # A stale lock (a killed run from long ago) is broken with a warning naming its holder.
    set_lock(host, "crashed@ci-runner", "2020-01-01T00:00:00Z", 60)
    start_load(host, "loadgen", 20000)
    assert frontend(host) == ("blue", "1")

    rc, out, deploy_s = play(
        "deploy.yml",
        {
            "color": "green",
            "model": f"{MODELS}/v2/model.pt",
            "model_version": "2",
            # A path model's lineage, given by the user (registry models carry it in their tags).
            "deploy_data_rev": DATA_REV,
            "deploy_data_md5": DATA_MD5,
            **FAST,
        },
    )
    assert rc == 0, out[-3000:]
    assert "breaking a stale fleet deploy lock /var/lib/sovereign/deploy.lock held by crashed@ci-runner" in out
    assert live_color(host) == "green"
    assert frontend(host) == ("green", "2")
    # The smoke test also went over gRPC, on green's own gRPC port (deploy_smoke_grpc_requests, default 5).
    assert grpc_infer_answered(host, "green") >= 5
    blue_grpc = grpc_infer_answered(host, "blue")

    rc, out, rollback_s = play("rollback.yml")
    assert rc == 0, out[-3000:]
    assert live_color(host) == "blue"
    assert frontend(host) == ("blue", "1")
    # Rollback's smoke test of blue too (blue kept running: its count goes on from before).
    assert grpc_infer_answered(host, "blue") >= blue_grpc + 5
    print(f"deploy.yml {deploy_s:.1f}s, rollback.yml {rollback_s:.1f}s (wall, including ansible-playbook start)")

    load = stop_load(host, "loadgen")
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
    assert (deploy["data_rev"], deploy["data_md5"], deploy["run_id"]) == (DATA_REV, DATA_MD5, "")
    assert deploy["who"] and deploy["time"] and deploy["host"]
    assert (rollback["action"], rollback["result"], rollback["color"], rollback["previous_color"]) == (
        "rollback",
        "success",
        "blue",
        "green",
    )
    # blue's v1 came from the role, not from a deploy: its data version is unknown, and said so.
    assert (rollback["data_rev"], rollback["data_md5"]) == ("", "")
    prom = host.file(METRICS)
    assert prom.mode == 0o644
    assert 'sovereign_deploy_live_color{color="blue"} 1.0' in prom.content_string
    assert 'sovereign_deploy_model_info{color="green",model="demo",version="2"} 1.0' in prom.content_string
    assert 'sovereign_deploy_last_success{action="deploy"} 1.0' in prom.content_string
    assert (
        f'sovereign_deploy_model_data_info{{color="green",data_md5="{DATA_MD5}",data_rev="{DATA_REV}"}} 1.0'
        in prom.content_string
    )
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
@pytest.mark.usefixtures("blue_live_v1")
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
@pytest.mark.usefixtures("blue_live_v1")
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
@pytest.mark.usefixtures("blue_live_v1")
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


@pytest.mark.fault
@pytest.mark.usefixtures("blue_live_v1")
def test_fault_runtime_that_cannot_reach_its_registry_is_named(host, mlflow_server):
    """Issue 9: green's runtime cannot reach its tracking server (its model.env points it at 127.0.0.1:9, where
    nothing listens; the controller resolves the model from the real MLflow server). The deploy stops once the
    runtime reports state failed, not after the whole ready timeout, and its message quotes the runtime's
    readiness reason naming that host and port, not "model is loading". Blue keeps serving."""
    timeout = 170
    rc, out, seconds = play(
        "deploy.yml",
        {
            "color": "green",
            "model": "models:/demo/2",
            "deploy_tracking_uri": mlflow_server,
            "deploy_model_extra_env": {
                "SOVEREIGN_RUNTIME_TRACKING_URI": "http://127.0.0.1:9",
                "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            },
            "deploy_ready_timeout_s": timeout,
            **FAST,
        },
    )
    assert rc != 0
    message = out.split("Last journal lines", maxsplit=1)[0]  # the readiness part, before the journal quoted after it
    assert "green did not become ready" in message, message[-3000:]
    assert "the runtime reports state 'failed'" in message, message[-3000:]
    assert "127.0.0.1:9" in message, message[-3000:]
    assert "model is loading" not in message
    assert seconds < timeout, f"the deploy waited {seconds:.0f}s, the whole ready timeout"
    _assert_blue_kept(host, out, "127.0.0.1:9")


def runtime_map_color(host):
    """The live color HAProxy routes to now (its runtime map, through the admin socket), not the map file's."""
    script = (
        f"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{where(host)['admin_socket']}'); "
        f"s.sendall(b'show map {where(host)['map_file']}\\n'); print(s.makefile().read())"
    )
    out = host.check_output(f'python3 -c "{script}"')
    return next(line.split()[-1] for line in out.splitlines() if " live " in f" {line} ")


@pytest.mark.fault
@pytest.mark.usefixtures("blue_live_v1")
def test_fault_playbook_killed_mid_switch_then_rerun_converges(host):
    """SIGKILL the whole ansible-playbook process group while green is being switched to (its blue_green_switch
    holds the host's switch lock), under load; the same deploy run again breaks the dead run's fleet lock (same
    controller, its ansible-playbook gone) and converges: green live in HAProxy's runtime map and file, one
    success record, no lock left, not one failed request."""
    extra = {"color": "green", "model": f"{MODELS}/v2/model.pt", "model_version": "2", **FAST}
    switch_lock = "/run/sovereign/blue_green_switch.lock"
    assert live_color(host) == "blue"
    records_before = len(ledger(host))
    start_load(host, "killgen", 2000)

    proc = subprocess.Popen(
        command("deploy.yml", extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes every worker and podman exec with it
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    # Trigger: the switch module holds the host's switch lock (green is ready, passed its smoke test and is being
    # switched to). Watched from inside the container by one process reading the lock file every millisecond: on a
    # quiet machine the switch holds it for a few ms only, and a shell loop spawning grep every 10 ms missed it
    # (CI 2026-12-01 22:28: the deploy ran to its end unkilled).
    poll = (
        "import sys, time\n"
        "while True:\n"
        "    try:\n"
        "        text = open(sys.argv[1]).read()\n"
        "    except OSError:\n"
        "        text = ''\n"
        "    if 'blue_green_switch to green' in text:\n"
        "        print(text)\n"
        "        break\n"
        "    time.sleep(0.001)\n"
    )
    watcher = subprocess.Popen(
        ["podman", "exec", host.backend.name, "timeout", "400", "/usr/bin/python3", "-c", poll, switch_lock],
        stdout=subprocess.PIPE,
        text=True,
    )
    killed_at = None
    try:
        while killed_at is None:
            if watcher.poll() is not None:
                if watcher.returncode == 0 and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = watcher.stdout.read().strip()
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if watcher.poll() is None:
            watcher.kill()
        proc.wait(30)
        reader.join(10)
        watcher.wait(30)
    output = "".join(lines)
    print(f"killed deploy.yml (pid {proc.pid}) while the switch held {switch_lock}: {killed_at}\n{output[-3000:]}")
    assert killed_at, f"the kill did not land in the switch (watcher rc {watcher.returncode}):\n{output[-4000:]}"
    assert "Switch traffic to green]" in output  # TASK [sovereign.mlops.release : Switch traffic to green]
    assert proc.returncode == -signal.SIGKILL
    # What the killed run left: its fleet lock, naming this controller and its dead ansible-playbook.
    left = json.loads(host.file(f"{LOCK}/info.json").content_string)
    assert left["controller_pid"] == proc.pid, left

    rc, out, rerun_s = play("deploy.yml", extra)
    assert rc == 0, out[-3000:]
    assert f"breaking the fleet deploy lock {LOCK} held by" in out
    dead = f"(ansible-playbook pid {proc.pid} on {left['controller']}): that ansible-playbook is no longer running"
    assert dead in out

    assert live_color(host) == "green"
    assert runtime_map_color(host) == "green"
    assert frontend(host) == ("green", "2")
    assert not host.file(LOCK).exists
    assert host.run(f"flock -n {switch_lock} true").rc == 0, "the switch lock is still held"
    new = ledger(host)[records_before:]
    assert [(r["action"], r["result"], r["color"], r["previous_color"]) for r in new] == [
        ("deploy", "success", "green", "blue")
    ], new
    assert (new[0]["model_name"], new[0]["model_version"]) == ("demo", "2")
    # Either path converges: the killed run's switch module finished on the host (podman exec outlives its
    # client) and the re-run found green live with v2 (restarted nothing), or it had not switched yet.
    resumed = "an interrupted run had switched to it" in new[0]["reason"]
    print("re-run", "resumed the switched green (no restart)" if resumed else "deployed green again")
    prom = host.file(METRICS).content_string
    assert 'sovereign_deploy_live_color{color="green"} 1.0' in prom

    load = stop_load(host, "killgen")
    print(f"re-run {rerun_s:.1f}s; load:", json.dumps({k: v for k, v in load.items() if k != "p99_by_second"}))
    assert load["failures"] == 0, load["error_samples"]
    assert load["by_color"].get("green", 0) > 0
    assert load["by_color"].get("blue", 0) > 0


# -- sovereign-ops over real SSH -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_inventory(host, tmp_path_factory):
    """An inventory that reaches this scenario's container over real SSH (its podman IP, port 22): a throwaway
    ed25519 key authorized for root for the test's duration, its host keys from ssh-keyscan checked strictly.
    The host keeps its molecule name, so ledger records and the playbook's hosts match."""
    name = host.backend.name
    base = tmp_path_factory.mktemp("ssh")
    key = base / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sovereign-ops-test", "-f", str(key)], check=True
    )
    pub = (base / "id_ed25519.pub").read_text().strip()
    host.check_output(
        f"install -d -m 0700 /root/.ssh && printf '%s\\n' '{pub}' >> /root/.ssh/authorized_keys && "
        "chmod 0600 /root/.ssh/authorized_keys && systemctl is-active ssh"
    )
    address = subprocess.run(
        ["podman", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert address, f"podman has no IP address for {name}"
    known_hosts = base / "known_hosts"
    deadline = time.monotonic() + 60
    while True:
        scan = subprocess.run(["ssh-keyscan", "-T", "5", address], capture_output=True, text=True, check=False)
        if scan.stdout.strip():
            break
        assert time.monotonic() < deadline, f"ssh-keyscan {address}: {scan.stderr}"
        time.sleep(2)
    known_hosts.write_text(scan.stdout)
    inventory = base / "hosts.yml"
    inventory.write_text(
        json.dumps(  # JSON is YAML
            {
                "all": {
                    "children": {
                        "inference": {
                            "hosts": {
                                name: {
                                    "ansible_host": address,
                                    "ansible_user": "root",
                                    "ansible_ssh_private_key_file": str(key),
                                    "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} "
                                    "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
                                    "ansible_python_interpreter": "/usr/bin/python3",
                                }
                            }
                        }
                    }
                }
            },
            indent=1,
        )
    )
    yield inventory
    host.run("sed -i '/ sovereign-ops-test$/d' /root/.ssh/authorized_keys")


def ops(inventory, *args, answer=None):
    """Run this checkout's sovereign-ops (python -m sovereign_ops) as a person would; returns (rc, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "ops"))
    proc = subprocess.run(
        [sys.executable, "-m", "sovereign_ops", "-i", str(inventory), *args],
        input=answer,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=PROJECT,
        check=False,
    )
    print(f"--- sovereign-ops {' '.join(args)} -> rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.returncode, proc.stdout, proc.stderr


def test_sovereign_ops_over_ssh(host, ssh_inventory):
    name = host.backend.name
    before_live = live_color(host)
    other = "green" if before_live == "blue" else "blue"
    models = {
        color: dict(
            line.split("=", 1)
            for line in host.file(where(host)["model_env"][color]).content_string.splitlines()
            if line.startswith("SOVEREIGN_RUNTIME_MODEL_")
        )
        for color in ("blue", "green")
    }

    # status: live color (HAProxy's and the file's agree) and each color's model, over SSH.
    rc, out, err = ops(ssh_inventory, "status", "--json")
    assert rc == 0, err
    (row,) = json.loads(out)
    assert (row["host"], row["ok"], row["live"]) == (name, True, before_live), row
    for color in ("blue", "green"):
        assert row["colors"][color]["version"] == models[color]["SOVEREIGN_RUNTIME_MODEL_VERSION"]
        assert row["colors"][color]["model"] == "demo"
        assert row["colors"][color]["ready"] is True
    rc, out, err = ops(ssh_inventory, "status")
    assert rc == 0, err
    table = out.splitlines()[-1].split()
    assert table[:2] == [name, before_live], out
    assert f"demo v{models['blue']['SOVEREIGN_RUNTIME_MODEL_VERSION']} (ready)" in out

    # history: the host's ledger, newest first (the deploy and rollback of the test above are in it).
    records = ledger(host)
    assert records, "the ledger is empty: run after test_deploy_and_rollback_under_load_lose_no_request"
    rc, out, err = ops(ssh_inventory, "history", "-n", "0", "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert [(r["time"], r["action"], r["result"], r["color"]) for r in shown] == [
        (r["time"], r["action"], r["result"], r["color"]) for r in reversed(records)
    ]
    rc, out, err = ops(ssh_inventory, "history", "-n", "2")
    assert rc == 0, err
    assert len(out.splitlines()) == 3, out  # header + 2 records
    last = records[-1]
    assert f"{last['previous_color']}->{last['color']}" in out.splitlines()[1]
    assert last["action"] in out.splitlines()[1]

    # rollback, declined: nothing runs, nothing changes.
    before = snapshot(host)
    rc, out, err = ops(ssh_inventory, "rollback", answer="n\n")
    assert rc == 1
    assert "aborted; nothing was changed" in err
    assert snapshot(host) == before
    rc, out, err = ops(ssh_inventory, "rollback", answer="")  # stdin closed: nobody said yes
    assert rc == 1
    assert "aborted; nothing was changed" in err
    assert snapshot(host) == before

    # rollback, confirmed: rollback.yml over SSH flips the live color and records it.
    rc, out, err = ops(ssh_inventory, "rollback", answer="y\n")
    assert rc == 0, (out + err)[-3000:]
    assert f"Roll back {name} to each host's previous color?" in out
    assert live_color(host) == other
    assert runtime_map_color(host) == other
    assert frontend(host)[0] == other
    new = ledger(host)[len(records) :]
    assert [(r["action"], r["result"], r["previous_color"], r["color"], r["host"]) for r in new] == [
        ("rollback", "success", before_live, other, name)
    ], new
    assert not host.file(LOCK).exists
    rc, out, err = ops(ssh_inventory, "status", "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["live"] == other
