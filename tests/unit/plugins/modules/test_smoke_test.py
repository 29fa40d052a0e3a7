# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""smoke_test against a real (tiny) OIP v2 server on loopback, plus tables for the _oip helpers."""

from __future__ import annotations

import sys

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _oip
from ansible_collections.sovereign.mlops.plugins.modules import smoke_test
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import (
    GOLDEN,
    GRPCOIPServer,
    OIPServer,
    refused_port,
    run_module,
)
from ports import free_port

# Latency limits are generous in passing cases (machines are noisy); the failing latency case uses a server
# that sleeps 80 ms per request against a 50 ms limit, a lower bound that noise can only make larger.
GENEROUS = dict(max_p99_ms=5000)

CASES = [
    dict(
        id="correct-inline-golden",
        mode="correct",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=False,
        checks=dict(ready=True, golden_source=True, status=True, schema=True, golden=True, latency_p99=True),
        result=dict(requests=20, failures=0, model_version="7", golden_source="inline"),
        connections=1,
    ),
    dict(
        id="golden-from-metadata",
        mode="correct",
        args=dict(GENEROUS),
        failed=False,
        checks=dict(golden_source=True, golden=True),
        result=dict(golden_source="metadata"),
        connections=1,
    ),
    dict(
        id="golden-from-metadata-json-string",
        mode="metadata_json_string",
        args=dict(GENEROUS),
        failed=False,
        checks=dict(golden=True),
        result=dict(golden_source="metadata"),
    ),
    dict(
        id="no-golden-anywhere",
        mode="no_golden_metadata",
        args=dict(GENEROUS),
        failed=True,
        msg="golden_source: no golden option given and the model metadata",
        checks=dict(golden_source=False),
    ),
    dict(
        id="metadata-golden-is-a-label",
        mode="metadata_golden_label",
        args=dict(GENEROUS),
        failed=True,
        msg="has parameters.golden = '/models/double/golden.json', not the golden example itself",
    ),
    dict(
        id="golden-without-outputs-skips-compare",
        mode="golden_mismatch",
        args=dict(golden={"inputs": GOLDEN["inputs"]}, **GENEROUS),
        failed=False,
        checks=dict(golden=None),
    ),
    dict(
        id="wrong-status",
        mode="wrong_status",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=True,
        msg='status: request 1 (warm-up) answered 500: {"error": "CUDA error: out of memory"}',
        checks=dict(status=False, schema=None, golden=None, latency_p99=None),
        result=dict(failures=22),
    ),
    dict(
        id="bad-schema",
        mode="bad_schema",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=True,
        msg="schema: request 1 (warm-up): output 0 'y': data has 3 elements but shape [1, 4] needs 4",
        checks=dict(status=True, schema=False),
    ),
    dict(
        id="wrong-model-name",
        mode="wrong_model",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=True,
        msg="schema: request 1 (warm-up): model_name is 'other', expected 'double'",
    ),
    dict(
        id="golden-mismatch",
        mode="golden_mismatch",
        args=dict(golden=GOLDEN, rtol=1e-4, **GENEROUS),
        failed=True,
        msg="golden: request 1 (warm-up): golden output mismatch for output 'y' at index 3: got 0.12 expected 8 "
        "(rtol 0.0001, atol 1e-05)",
        checks=dict(status=True, schema=True, golden=False),
    ),
    dict(
        id="golden-mismatch-within-atol",
        mode="golden_mismatch",
        args=dict(golden=GOLDEN, atol=10.0, **GENEROUS),
        failed=False,
        checks=dict(golden=True),
    ),
    dict(
        id="tolerance-from-golden",
        mode="golden_mismatch",
        args=dict(golden=dict(GOLDEN, atol=10.0), **GENEROUS),
        failed=False,
        checks=dict(golden=True),
    ),
    dict(
        id="nested-data",
        mode="nested_data",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=False,
        checks=dict(schema=True, golden=True),
    ),
    dict(
        id="server-closes-each-connection",
        mode="close_each",
        args=dict(golden=GOLDEN, requests=5, **GENEROUS),
        failed=False,
        result=dict(requests=5, failures=0),
        connections=7,
    ),
    dict(
        id="slow-p99-over-threshold",
        mode="slow",
        args=dict(golden=GOLDEN, requests=4, warmup=1, max_p99_ms=50),
        failed=True,
        msg="latency_p99: p99 ",
        checks=dict(golden=True, latency_p99=False),
        result=dict(requests=4, failures=0),
    ),
    dict(
        id="slow-p50-over-threshold",
        mode="slow",
        args=dict(golden=GOLDEN, requests=3, warmup=0, max_p50_ms=50, max_p99_ms=5000),
        failed=True,
        msg="latency_p50: p50 ",
        checks=dict(latency_p50=False, latency_p99=True),
    ),
    dict(
        id="expect-model-version-ok",
        mode="correct",
        args=dict(golden=GOLDEN, expect_model_version="7", **GENEROUS),
        failed=False,
        checks=dict(model_version=True),
    ),
    dict(
        id="expect-model-version-wrong",
        mode="correct",
        args=dict(golden=GOLDEN, expect_model_version="8", **GENEROUS),
        failed=True,
        msg="model_version: request 1 (warm-up): model_version is '7', expected 8",
    ),
    dict(
        id="not-ready",
        mode="not_ready",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=True,
        msg="ready: ",
        checks=dict(ready=False),
        result=dict(requests=0),
    ),
    dict(
        id="not-ready-check-skipped",
        mode="not_ready",
        args=dict(golden=GOLDEN, check_ready=False, **GENEROUS),
        failed=False,
        checks=dict(status=True),
    ),
    dict(
        id="unreachable-port",
        mode="unreachable",
        args=dict(golden=GOLDEN, **GENEROUS),
        failed=True,
        msg="is unreachable (connection refused)",
        checks=dict(ready=False),
    ),
    dict(
        id="unreachable-port-no-ready-check",
        mode="unreachable",
        args=dict(golden=GOLDEN, check_ready=False),
        failed=True,
        msg="status: request 1 (warm-up) to http://127.0.0.1:",
        result=dict(failures=3),
    ),
    dict(
        id="invalid-golden-option",
        mode="correct",
        args=dict(golden={"inputs": []}),
        failed=True,
        msg="invalid golden option: golden.inputs must be a non-empty list",
    ),
    dict(id="bad-url", mode="correct", args=dict(url="ftp://x"), failed=True, msg="url: 'ftp://x' is not an http"),
    dict(
        id="check-mode-runs-too",
        mode="correct",
        args=dict(golden=GOLDEN, **GENEROUS),
        check_mode=True,
        failed=False,
        checks=dict(golden=True),
        result=dict(requests=20),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_smoke(case, capsys):
    server = OIPServer(mode=case["mode"]).start()
    try:
        url = server.url
        if case["mode"] == "unreachable":
            url = f"http://127.0.0.1:{free_port()}"
        args = dict(url=url, model_name="double", timeout=5)
        args.update(case["args"])
        result = run_module(smoke_test.main, args, capsys, check_mode=case.get("check_mode", False))
    finally:
        server.stop()

    assert result["changed"] is False
    assert bool(result.get("failed")) is case["failed"], result
    if "msg" in case:
        assert case["msg"] in result["msg"], result["msg"]
    by_name = dict((c["name"], c["passed"]) for c in result.get("checks", []))
    for name, passed in case.get("checks", {}).items():
        assert by_name.get(name, "absent") is passed, (name, result.get("checks"))
    for key, value in case.get("result", {}).items():
        assert result[key] == value, (key, result)
    if "connections" in case:
        assert server.connections == case["connections"]
    if not case["failed"]:
        assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
        if result["checks"][0]["name"] == "ready":
            assert "passed" in result["msg"]


# ---------------------------------------------------------------------------------------------------------------
# _oip helpers
# ---------------------------------------------------------------------------------------------------------------

PERCENTILES = [
    ("empty", [], 99, None),
    ("one", [5.0], 50, 5.0),
    ("p50-of-4", [4.0, 1.0, 3.0, 2.0], 50, 2.0),
    ("p99-of-20-is-max", [float(i) for i in range(1, 21)], 99, 20.0),
    ("p95-of-20", [float(i) for i in range(1, 21)], 95, 19.0),
    ("p95-of-100", [float(i) for i in range(1, 101)], 95, 95.0),
]


@pytest.mark.parametrize("values,pct,expected", [c[1:] for c in PERCENTILES], ids=[c[0] for c in PERCENTILES])
def test_percentile(values, pct, expected):
    assert _oip.percentile(values, pct) == expected


T = dict(name="y", shape=[2], datatype="FP32", data=[1.0, 2.0])
RESPONSES = [
    ("ok", dict(model_name="m", outputs=[T]), None),
    ("not-object", [], "response is not a JSON object"),
    ("wrong-model", dict(model_name="n", outputs=[T]), "model_name is 'n', expected 'm'"),
    ("no-outputs", dict(model_name="m"), "outputs is missing or empty"),
    ("empty-outputs", dict(model_name="m", outputs=[]), "outputs is missing or empty"),
    ("no-name", dict(model_name="m", outputs=[dict(T, name="")]), "output 0 has no name"),
    ("bad-shape", dict(model_name="m", outputs=[dict(T, shape=[-1])]), "shape must be a list of non-negative"),
    ("bad-datatype", dict(model_name="m", outputs=[dict(T, datatype="FLOAT")]), "datatype 'FLOAT' is not an OIP"),
    ("no-data", dict(model_name="m", outputs=[dict((k, v) for k, v in T.items() if k != "data")]), "has no data"),
    ("length", dict(model_name="m", outputs=[dict(T, data=[1.0])]), "data has 1 elements but shape [2] needs 2"),
    ("nested-ok", dict(model_name="m", outputs=[dict(T, shape=[1, 2], data=[[1.0, 2.0]])]), None),
    ("strings-in-fp32", dict(model_name="m", outputs=[dict(T, data=["a", "b"])]), "FP32 data holds non-numeric"),
    ("bytes-ok", dict(model_name="m", outputs=[dict(T, datatype="BYTES", data=["a", "b"])]), None),
    ("bool-bad", dict(model_name="m", outputs=[dict(T, datatype="BOOL", data=[1, 0])]), "BOOL data holds non-bool"),
    ("scalar-shape-empty", dict(model_name="m", outputs=[dict(T, shape=[], data=[3.0])]), None),
]


@pytest.mark.parametrize("obj,expected", [c[1:] for c in RESPONSES], ids=[c[0] for c in RESPONSES])
def test_check_infer_response(obj, expected):
    error = _oip.check_infer_response(obj, "m")
    if expected is None:
        assert error is None
    else:
        assert expected in error


COMPARES = [
    ("equal", [1.0, 2.0], [1.0, 2.0], 0.0, 0.0, None),
    ("within-rtol", [1.0, 2.0001], [1.0, 2.0], 1e-4, 0.0, None),
    ("outside-rtol", [1.0, 2.001], [1.0, 2.0], 1e-4, 0.0, "at index 1: got 2.001 expected 2 (rtol 0.0001, atol 0)"),
    ("within-atol-near-zero", [1e-7, 2.0], [0.0, 2.0], 0.0, 1e-6, None),
    ("nan-equal", [float("nan"), 2.0], [float("nan"), 2.0], 0.0, 0.0, None),
    ("nan-got", [float("nan"), 2.0], [1.0, 2.0], 0.1, 0.1, "at index 0: got nan expected 1"),
    ("int-exact", [3, 4], [3, 4], 0.0, 0.0, None),
    ("length", [1.0], [1.0, 2.0], 0.0, 0.0, "1 values, expected 2"),
]


@pytest.mark.parametrize("got,expected,rtol,atol,error", [c[1:] for c in COMPARES], ids=[c[0] for c in COMPARES])
def test_compare_outputs(got, expected, rtol, atol, error):
    outputs = [dict(name="y", shape=[len(got)], datatype="FP32", data=got)]
    want = [dict(name="y", data=expected)]
    result = _oip.compare_outputs(outputs, want, rtol, atol)
    if error is None:
        assert result is None
    else:
        assert error in result and "output 'y'" in result


def test_compare_outputs_missing_and_shape():
    outputs = [dict(name="y", shape=[2], datatype="FP32", data=[1.0, 2.0])]
    assert "golden output 'z' is missing" in _oip.compare_outputs(outputs, [dict(name="z", data=[1.0])], 0, 0)
    assert "shape [2], expected [1, 2]" in _oip.compare_outputs(
        outputs, [dict(name="y", shape=[1, 2], data=[1.0, 2.0])], 0, 0
    )
    assert "datatype FP32, expected FP64" in _oip.compare_outputs(
        outputs, [dict(name="y", datatype="FP64", data=[1.0, 2.0])], 0, 0
    )


METADATA = [
    ("mapping", {"parameters": {"golden": {"inputs": []}}}, {"inputs": []}),
    ("json-string", {"parameters": {"golden": '{"inputs": []}'}}, {"inputs": []}),
    ("no-parameters", {"name": "m"}, None),
    ("no-golden", {"parameters": {"other": 1}}, None),
    ("not-a-dict", ["x"], None),
]


@pytest.mark.parametrize("meta,expected", [c[1:] for c in METADATA], ids=[c[0] for c in METADATA])
def test_golden_from_metadata(meta, expected):
    assert _oip.golden_from_metadata(meta) == expected


URLS = [
    ("http", "http://127.0.0.1:8002", ("http", "127.0.0.1", 8002, "")),
    ("http-default-port-path", "http://host/base/", ("http", "host", 80, "/base")),
    ("https", "https://h", ("https", "h", 443, "")),
    ("ipv6", "http://[::1]:9000", ("http", "::1", 9000, "")),
]


@pytest.mark.parametrize("url,expected", [c[1:] for c in URLS], ids=[c[0] for c in URLS])
def test_split_url(url, expected):
    assert _oip.split_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://h", "h:80", "http://", "http://h:99999"])
def test_split_url_rejects(url):
    with pytest.raises(_oip.URLError):
        _oip.split_url(url)


def _contract(port):
    return dict(version=1, runtime=dict(colors=dict(green=dict(host="0.0.0.0", port=port), blue=dict(port=1))))


def test_url_from_the_contract(capsys):
    """color + contract: the runtime's own host and port from the host contract (a wildcard host: loopback)."""
    server = OIPServer(mode="correct").start()
    try:
        args = dict(model_name="double", color="green", contract=_contract(server.port), golden=GOLDEN, **GENEROUS)
        result = run_module(smoke_test.main, args, capsys)
    finally:
        server.stop()
    assert not result.get("failed"), result
    assert result["url"] == f"http://127.0.0.1:{server.port}"
    assert result["requests"] == 20


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (dict(), "no contract"),
        (dict(color="green"), "no contract"),
        (dict(contract=_contract(9)), "color None"),
        (dict(color="green", contract=dict(version=1)), "a contract without runtime.colors.green"),
    ],
    ids=["nothing", "color-only", "contract-only", "color-missing-in-contract"],
)
def test_url_or_contract_and_color_required(capsys, args, fragment):
    result = run_module(smoke_test.main, dict(model_name="double", **args), capsys)
    assert result["failed"] is True
    assert "give url, or color and a contract" in result["msg"]
    assert fragment in result["msg"], result["msg"]


# ---------------------------------------------------------------------------------------------------------------
# over OIP v2 gRPC (grpc_target): a real grpcio server beside the HTTP one
# ---------------------------------------------------------------------------------------------------------------

GRPC_CASES = [
    dict(
        id="pass",
        mode="correct",
        args=dict(expect_model_version="7"),
        failed=False,
        checks=dict(latency_p99=True, grpc_ready=True, grpc_infer=True),
        grpc=dict(requests=5, failures=0),
        calls=["ServerReady", "ModelReady"] + ["ModelInfer"] * 5,
    ),
    dict(
        id="pass-raw-answers-golden-from-metadata",
        mode="raw",
        args=dict(grpc_requests=2, golden=None),
        failed=False,
        checks=dict(golden_source=True, grpc_ready=True, grpc_infer=True),
        grpc=dict(requests=2, failures=0),
    ),
    dict(
        id="server-not-ready",
        mode="server_not_ready",
        failed=True,
        msg="grpc_ready: gRPC target 127.0.0.1:{port}: ServerReady is false",
        checks=dict(golden=True, grpc_ready=False, grpc_infer=None),
        grpc=dict(requests=0, p50_ms=None),
        calls=["ServerReady"],
    ),
    dict(
        id="model-not-ready",
        mode="model_not_ready",
        failed=True,
        msg="grpc_ready: gRPC target 127.0.0.1:{port}: ModelReady of model 'double' is false",
        checks=dict(grpc_ready=False, grpc_infer=None),
        calls=["ServerReady", "ModelReady"],
    ),
    dict(
        id="model-unknown-to-grpc",
        mode="correct",
        server_model="other",
        failed=True,
        msg="grpc_ready: gRPC target 127.0.0.1:{port}: ModelReady of model 'double' failed (NOT_FOUND: unknown model "
        "'double'); is model_name the model this runtime serves?",
        checks=dict(grpc_ready=False, grpc_infer=None),
    ),
    dict(
        id="wrong-outputs",
        mode="wrong_outputs",
        failed=True,
        msg="grpc_infer: gRPC call 1 to 127.0.0.1:{port}: golden output mismatch for output 'y' at index 3: got 0.12 "
        "expected 8 (rtol 0.0001, atol 1e-05) (5 of 5 calls failed)",
        checks=dict(golden=True, grpc_ready=True, grpc_infer=False),
        grpc=dict(requests=5, failures=5, p50_ms=None),
    ),
    dict(
        id="wrong-outputs-within-atol",
        mode="wrong_outputs",
        args=dict(atol=10.0),
        failed=False,
        checks=dict(grpc_infer=True),
    ),
    dict(
        id="wrong-model-version",
        mode="wrong_version",
        args=dict(expect_model_version="7"),
        failed=True,
        msg="grpc_infer: gRPC call 1 to 127.0.0.1:{port}: model_version is '8', expected 7",
        checks=dict(model_version=True, grpc_infer=False),
    ),
    dict(
        id="wrong-model-name-in-answer",
        mode="wrong_model",
        failed=True,
        msg="model_name is 'other', expected 'double'",
        checks=dict(grpc_infer=False),
    ),
    dict(
        id="calls-refused",
        mode="unavailable",
        failed=True,
        msg="grpc_infer: gRPC call 1 to 127.0.0.1:{port} failed: UNAVAILABLE: queue full (3 of 3 calls failed, "
        "stopped after 3 consecutive RPC failures)",
        grpc=dict(requests=3, failures=3),
    ),
    dict(
        id="server-gone",
        mode="gone",
        failed=True,
        msg="grpc_ready: gRPC target 127.0.0.1:{port} is unreachable or refused (UNAVAILABLE",
        checks=dict(golden=True, latency_p99=True, grpc_ready=False, grpc_infer=None),
        grpc=dict(requests=0),
    ),
    dict(
        id="check-mode-runs-too",
        mode="correct",
        check_mode=True,
        failed=False,
        checks=dict(grpc_ready=True, grpc_infer=True),
        grpc=dict(requests=5, failures=0),
    ),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c["id"] for c in GRPC_CASES])
def test_smoke_grpc(case, capsys):
    http = OIPServer(mode="correct").start()
    grpc_server = GRPCOIPServer(mode=case["mode"], model=case.get("server_model", "double"))
    if case["mode"] != "gone":
        grpc_server.start()
    try:
        with refused_port() as gone:
            port = gone if case["mode"] == "gone" else grpc_server.port
            args = dict(url=http.url, model_name="double", golden=GOLDEN, grpc_target=f"127.0.0.1:{port}", **GENEROUS)
            args.update(case.get("args", {}))
            if args["golden"] is None:
                del args["golden"]
            result = run_module(smoke_test.main, args, capsys, check_mode=case.get("check_mode", False))
    finally:
        grpc_server.stop()
        http.stop()

    assert result["changed"] is False
    assert bool(result.get("failed")) is case["failed"], result
    if "msg" in case:
        assert case["msg"].format(port=port) in result["msg"], result["msg"]
    names = [c["name"] for c in result["checks"]]
    by_name = dict((c["name"], c["passed"]) for c in result["checks"])
    for name, passed in case.get("checks", {}).items():
        assert by_name.get(name, "absent") is passed, (name, result["checks"])
    # the documented order: the HTTP checks and their latency, then gRPC
    assert names[-2:] == ["grpc_ready", "grpc_infer"], names
    figures = result["grpc"]
    assert figures["target"] == f"127.0.0.1:{port}"
    for key, value in case.get("grpc", {}).items():
        assert figures[key] == value, (key, figures)
    if "calls" in case:
        assert grpc_server.calls == case["calls"]
    if not case["failed"]:
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert grpc_server.requests, "no ModelInfer reached the server"
    for request in grpc_server.requests:  # the golden inputs, in typed contents
        (tensor,) = request.inputs
        assert (request.model_name, tensor.name, tensor.datatype, list(tensor.shape)) == ("double", "x", "FP32", [1, 4])
        assert list(tensor.contents.fp32_contents) == [1.0, 2.0, 3.0, 4.0]
        assert not request.raw_input_contents


def test_no_grpc_target_no_grpc_checks(capsys):
    server = OIPServer(mode="correct").start()
    try:
        result = run_module(
            smoke_test.main, dict(url=server.url, model_name="double", golden=GOLDEN, **GENEROUS), capsys
        )
    finally:
        server.stop()
    assert not result.get("failed"), result
    assert result["grpc"] is None
    assert not [c for c in result["checks"] if c["name"].startswith("grpc")]


GRPC_ARG_ERRORS = [
    ("grpc-requests-zero", dict(grpc_target="127.0.0.1:1", grpc_requests=0), "grpc_requests must be >= 1, got 0"),
    ("target-without-port", dict(grpc_target="127.0.0.1"), "grpc_target must be host:port, got '127.0.0.1'"),
    ("target-is-a-url", dict(grpc_target="http://h:80/x"), "grpc_target must be host:port"),
]


@pytest.mark.parametrize(("args", "fragment"), [c[1:] for c in GRPC_ARG_ERRORS], ids=[c[0] for c in GRPC_ARG_ERRORS])
def test_grpc_argument_errors(capsys, args, fragment):
    result = run_module(smoke_test.main, dict(url="http://127.0.0.1:1", model_name="double", **args), capsys)
    assert result["failed"] is True
    assert fragment in result["msg"], result["msg"]


def test_grpcio_missing(capsys, monkeypatch):
    """Without grpcio the module fails before any request, naming its interpreter and the fix."""
    server = OIPServer(mode="correct").start()
    monkeypatch.setattr(smoke_test, "grpc", None)
    try:
        args = dict(url=server.url, model_name="double", golden=GOLDEN, grpc_target="127.0.0.1:8202")
        result = run_module(smoke_test.main, args, capsys)
    finally:
        server.stop()
    assert result["failed"] is True
    assert f"the Python running this module, {sys.executable}, cannot import grpc (grpcio)" in result["msg"]
    assert "ansible_python_interpreter: <runtime venv>/bin/python" in result["msg"]
    assert server.connections == 0  # failed before the HTTP checks
