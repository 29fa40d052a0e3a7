"""Verifies the inference_runtime role: both colors serve a real TorchScript model (CPU; no GPU
here, so the CUDA path is not exercised) and answer real OIP v2 requests inside the container."""

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import host_contract

COLORS = {"blue": 8001, "green": 8002}
GRPC_PORTS = {"blue": 8201, "green": 8202}  # the role's default inference_runtime_grpc_ports (ADR 1705)
GOLDEN = "/var/lib/sovereign/models/demo/model.pt.golden.json"


def internal(host):
    """The host's internal address as the common role published it: where the runtimes listen (issue 15)."""
    return host_contract.read_contract(host)["common"]["internal_address"]


def _curl_json(host, *args):
    out = host.check_output("curl -sS --fail-with-body --max-time 10 " + " ".join(args))
    return json.loads(out)


@pytest.mark.parametrize("color", COLORS)
def test_service_runs_as_dedicated_user_hardened(host, color):
    svc = host.service(f"sovereign-runtime@{color}")
    assert svc.is_running
    assert svc.is_enabled
    props = svc.systemd_properties
    assert props["User"] == "sovereign-runtime"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["PrivateDevices"] == "yes"
    assert props["ReadWritePaths"] == f"/var/lib/sovereign/runtime/{color}"
    # An empty bounding set (no capabilities at all) is left out of systemd_properties.
    assert host.check_output(f"systemctl show -p CapabilityBoundingSet sovereign-runtime@{color}") == (
        "CapabilityBoundingSet="
    )


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_listens_on_the_internal_address_only(host, color, port):
    assert host.socket(f"tcp://{internal(host)}:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


@pytest.mark.parametrize("color", COLORS)
def test_env_files_are_private(host, color):
    for name in (f"{color}.env", f"{color}.model.env"):
        f = host.file(f"/etc/sovereign/runtime/{name}")
        assert f.user == "root"
        assert f.group == "sovereign"
        assert f.mode == 0o640


def test_mlflow_credentials_are_root_only(host):
    f = host.file("/etc/sovereign/runtime/mlflow-credentials.env")
    assert (f.user, f.group, f.mode) == ("root", "root", 0o600)


@pytest.mark.parametrize("color", COLORS)
def test_runtime_gets_the_mlflow_credentials_verbatim(host, color):
    """The password of converge.yml holds every character systemd's EnvironmentFile parser treats specially."""
    pid = host.check_output(f"systemctl show -p MainPID --value sovereign-runtime@{color}")
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")
    env = dict(line.split("=", 1) for line in environ.splitlines() if "=" in line)
    assert env["MLFLOW_TRACKING_USERNAME"] == "reader"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "p\"a$HOME`x`'s \\ #pw"


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_the_unit_runs_one_worker_per_core(host, color, port):
    """inference_runtime_workers auto on a CPU host: one worker per core (--workers, ADR 1710), each a child of the
    unit's main process (the supervisor); /metrics counts them all."""
    cores = int(host.check_output("nproc"))
    assert f"SOVEREIGN_RUNTIME_WORKERS={cores}\n" in host.file(f"/etc/sovereign/runtime/{color}.env").content_string
    main = host.check_output(f"systemctl show -p MainPID --value sovereign-runtime@{color}")
    children = host.check_output(f"grep -l '^PPid:[[:space:]]*{main}$' /proc/[0-9]*/status | wc -l")
    if cores == 1:  # one core: a single process, as without --workers
        assert int(children) == 0
        return
    assert int(children) == cores
    metrics = host.check_output(f"curl -sf http://{internal(host)}:{port}/metrics")
    assert f"sovereign_runtime_workers_ready {float(cores)}" in metrics


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_ready_and_metadata(host, color, port):
    assert host.run(f"curl -sf http://{internal(host)}:{port}/v2/health/ready").rc == 0
    meta = _curl_json(host, f"http://{internal(host)}:{port}/v2/models/demo")
    assert meta["name"] == "demo"
    assert meta["platform"] == "pytorch"
    assert "1" in meta["versions"]


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_infer_matches_golden_output(host, color, port):
    golden = json.loads(host.file(GOLDEN).content_string)
    body = json.dumps({"inputs": golden["inputs"]})
    url = f"http://{internal(host)}:{port}/v2/models/demo/infer"
    result = _curl_json(host, "-X POST -H 'Content-Type: application/json'", f"--data '{body}'", url)
    assert result["model_name"] == "demo"
    got = result["outputs"][0]
    want = golden["outputs"][0]
    assert got["shape"] == want["shape"]
    for g, w in zip(got["data"], want["data"], strict=True):
        assert math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_bad_input_is_a_4xx_with_a_message(host, color, port):
    out = host.run(
        "curl -s -o /dev/stdout -w '\\n%{http_code}' -X POST -H 'Content-Type: application/json' "
        f'--data \'{{"inputs": [{{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}}]}}\' '
        f"http://{internal(host)}:{port}/v2/models/demo/infer"
    )
    body, status = out.stdout.rsplit("\n", 1)
    assert status.startswith("4")
    assert json.loads(body)["error"]


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_metrics_report_model_and_color(host, color, port):
    metrics = host.check_output(f"curl -sf http://{internal(host)}:{port}/metrics")
    assert "sovereign_runtime_requests_total" in metrics
    assert f'color="{color}"' in metrics


_contract = host_contract.read_contract


def test_host_contract_has_the_runtime_section(host):
    runtime = _contract(host)["runtime"]
    assert runtime["config_dir"] == "/etc/sovereign/runtime"
    assert runtime["install_dir"] == "/opt/sovereign/runtime"
    assert runtime["health_path"] == "/v2/health/ready"
    assert sorted(runtime["colors"]) == sorted(COLORS)


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_host_contract_color_is_what_runs(host, color, port):
    """Every path and port the contract names is the one the running color really uses."""
    spec = _contract(host)["runtime"]["colors"][color]
    assert spec == {
        "host": internal(host),
        "port": port,
        "grpc_port": GRPC_PORTS[color],
        "unit": f"sovereign-runtime@{color}.service",
        "env_file": f"/etc/sovereign/runtime/{color}.env",
        "model_env": f"/etc/sovereign/runtime/{color}.model.env",
        "venv": f"/opt/sovereign/runtime/{color}",
        "experiment_dir": f"/var/lib/sovereign/runtime/{color}",
    }
    assert host.service(spec["unit"].removesuffix(".service")).is_running
    assert host.socket(f"tcp://{spec['host']}:{spec['port']}").is_listening
    env = dict(line.split("=", 1) for line in host.file(spec["env_file"]).content_string.splitlines() if "=" in line)
    assert env["SOVEREIGN_RUNTIME_PORT"] == str(spec["port"])
    assert env["SOVEREIGN_RUNTIME_GRPC_PORT"] == str(spec["grpc_port"])
    # A real ServerLive call with the color's own grpcio (testinfra's socket check misses gRPC's listener: grpc core
    # binds an IPv6 dual-stack socket, which ss lists as [::ffff:ADDRESS]).
    live = (
        "import grpc, sys; from sovereign_runtime.oip_grpc import oip_v2_pb2 as pb;"
        " call = grpc.insecure_channel(sys.argv[1]).unary_unary('/inference.GRPCInferenceService/ServerLive',"
        " request_serializer=pb.ServerLiveRequest.SerializeToString,"
        " response_deserializer=pb.ServerLiveResponse.FromString);"
        " print(call(pb.ServerLiveRequest(), timeout=30).live)"
    )
    answer = host.run(f'{spec["venv"]}/bin/python -c "{live}" {spec["host"]}:{spec["grpc_port"]}')
    assert answer.rc == 0 and answer.stdout.strip() == "True", answer.stderr
    assert env["SOVEREIGN_RUNTIME_EXPERIMENT_DIR"] == spec["experiment_dir"]
    assert host.file(spec["model_env"]).contains("SOVEREIGN_RUNTIME_MODEL_URI=")
    assert host.file(spec["venv"] + "/bin/python").exists
    assert host.run(f"curl -sf http://{spec['host']}:{spec['port']}/v2/health/ready").rc == 0


def test_host_contract_has_node_exporter(host):
    """The common role (in converge) publishes node_exporter's endpoint, and it serves metrics there."""
    contract = _contract(host)
    endpoint = contract["metrics"]["node_exporter"]
    assert endpoint["published_by"] == "common"
    assert (endpoint["port"], endpoint["path"]) == (9100, "/metrics")
    assert (endpoint["scheme"], endpoint["auth"]) == ("http", False)
    assert contract["common"]["textfile_dir"] == "/var/lib/prometheus/node-exporter"
    assert endpoint["address"] == contract["common"]["internal_address"]
    url = f"http://{endpoint['address']}:{endpoint['port']}{endpoint['path']}"
    assert "node_exporter_build_info" in host.check_output(f"curl -sf {url}")


@pytest.mark.parametrize(("color", "port"), COLORS.items())
def test_host_contract_runtime_metrics_endpoint(host, color, port):
    endpoint = _contract(host)["metrics"][f"sovereign_runtime_{color}"]
    assert endpoint["job"] == "sovereign_runtime"
    assert endpoint["labels"] == {"color": color}
    assert (endpoint["address"], endpoint["port"], endpoint["path"]) == (internal(host), port, "/metrics")
    out = host.check_output(f"curl -sf http://{endpoint['address']}:{endpoint['port']}{endpoint['path']}")
    assert f'color="{color}"' in out
