#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: smoke_test
short_description: Smoke-test an Open Inference Protocol (v2) model endpoint
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._attributes.read_only
  - sovereign.mlops._host_contract
description:
  - Sends O(requests) inference requests (C(POST {url}/v2/models/{model_name}/infer)) to one runtime, usually a
    color's own port (not the traffic switch), and checks, in this order
    C(ready) (optional), C(golden_source), C(status), C(schema), C(golden), C(model_version) (optional),
    C(latency_p50), C(latency_p95), C(latency_p99), then, with O(grpc_target), C(grpc_ready) and C(grpc_infer).
  - Every response must be HTTP 200 and a well-formed OIP v2 inference response (C(model_name), C(outputs) with
    C(name), C(shape), C(datatype), C(data), and as many data elements as the shape's product).
  - Outputs are compared with the golden outputs elementwise, C(|got - expected| <= atol + rtol * |expected|).
    The golden example (inputs and expected outputs) is given in O(golden) or, when O(golden) is omitted, read
    from the model's metadata, C(GET {url}/v2/models/{model_name}), key C(parameters.golden) (a mapping or a JSON
    string with the same layout).
  - Latency is the time from sending a request to reading its whole response, on one keep-alive connection
    (reopened when the server closes it). O(warmup) requests are sent first and left out of the figures.
    Percentiles use the nearest-rank method, so with 20 requests p99 is the slowest one.
  - When the golden example comes from the model metadata and that says the runtime serves a Feast feature
    service (C(parameters.feature_service)) with golden rows by entity key (C(golden_entity_inputs)), one more
    request sends only those keys, so the runtime fetches the features from its online store, and check
    C(entity_golden) compares its outputs with the golden outputs (after C(golden)). Otherwise it is skipped.
  - With O(grpc_target), the same runtime is then checked over OIP v2 gRPC (C(inference.GRPCInferenceService),
    cleartext HTTP/2), after the HTTP checks and their latency checks, C(grpc_ready) (C(ServerReady) and
    C(ModelReady) of O(model_name) both true) and C(grpc_infer) (O(grpc_requests) C(ModelInfer) calls with the
    golden inputs in typed contents; every answer must be a well-formed inference response of O(model_name) with the
    golden outputs within the same tolerances and, when set, O(expect_model_version)). Their latency is reported in
    RV(grpc), not checked. They run only once a golden example was found, and need the Python package C(grpcio) on
    the managed host (no C(protobuf), the module carries its own codec of the few messages it uses).
  - On failure, RV(ignore:msg) names the first check (in the order above) that failed.
  - The module only reads. It never changes anything (C(changed) is always false) and runs in check mode too.
options:
  url:
    description:
      - Base URL of the runtime, for example C(http://127.0.0.1:8002) for green's own port.
      - Required unless O(contract) and O(color) are given, which default it to that color's own host and port
        (C(runtime.colors.<color>)).
    type: str
  color:
    description:
      - The color to test on its own port, looked up in O(contract). Ignored when O(url) is given.
    type: str
    choices: [blue, green]
  model_name:
    description:
      - Name of the model, as in the OIP paths.
    type: str
    required: true
  requests:
    description:
      - How many measured inference requests to send.
    type: int
    default: 20
  warmup:
    description:
      - How many inference requests to send first and leave out of the latency figures (their answers are still
        checked).
    type: int
    default: 2
  timeout:
    description:
      - Seconds allowed for each request.
    type: float
    default: 5
  golden:
    description:
      - The golden example, C({inputs, outputs, rtol, atol}).
      - C(inputs) is a list of OIP input tensors (C(name), C(shape), C(datatype), C(data)), sent in every request.
      - C(outputs) is a list of expected OIP output tensors (at least C(name) and C(data); C(shape) and C(datatype)
        are compared when given). Without C(outputs) the golden check is skipped (schema and latency only).
      - C(rtol) and C(atol) are optional tolerances (see O(rtol) and O(atol)).
      - When omitted, it is read from the model metadata's C(parameters.golden).
    type: dict
  rtol:
    description:
      - Relative tolerance of the golden comparison. Defaults to the golden example's own C(rtol), else V(1e-4).
    type: float
  atol:
    description:
      - Absolute tolerance of the golden comparison. Defaults to the golden example's own C(atol), else V(1e-5)
        (the runtime's own readiness check uses the same defaults).
    type: float
  max_p99_ms:
    description:
      - Largest acceptable 99th percentile latency, in milliseconds.
    type: float
    default: 50
  max_p95_ms:
    description:
      - Largest acceptable 95th percentile latency, in milliseconds (not checked when omitted).
    type: float
  max_p50_ms:
    description:
      - Largest acceptable median latency, in milliseconds (not checked when omitted).
    type: float
  expect_model_version:
    description:
      - When set, every response's C(model_version) must equal it.
    type: str
  check_ready:
    description:
      - Check C(GET {url}/v2/health/ready) answers 200 before sending inference requests.
    type: bool
    default: true
  headers:
    description:
      - Extra HTTP headers sent with every request (for example an authorization header).
    type: dict
    default: {}
  grpc_target:
    description:
      - The runtime's OIP v2 gRPC endpoint, C(host:port), for example C(127.0.0.1:8202) for green's own gRPC port
        (the host contract's C(runtime.colors.<color>.grpc_port)).
      - When omitted, nothing is checked over gRPC and RV(grpc) is null.
      - Needs C(grpcio) importable by the Python that runs the module; a color's runtime venv has it (run the task
        with C(ansible_python_interpreter) set to C(<venv>/bin/python)).
    type: str
  grpc_requests:
    description:
      - How many C(ModelInfer) calls to send to O(grpc_target) (at least 1). Ignored without O(grpc_target).
    type: int
    default: 5
notes:
  - The inference requests are real requests to the runtime; inference must be free of side effects (OIP
    inference is).
seealso:
  - module: sovereign.mlops.blue_green_switch
"""

EXAMPLES = r"""
- name: Smoke-test green on its own port, golden example from the model metadata
  sovereign.mlops.smoke_test:
    url: http://127.0.0.1:8002
    model_name: iris
    requests: 50
    max_p99_ms: 50
    expect_model_version: "7"

- name: Golden example given inline
  sovereign.mlops.smoke_test:
    url: http://127.0.0.1:8002
    model_name: adder
    golden:
      inputs:
        - {name: x, shape: [1, 2], datatype: FP32, data: [1.0, 2.0]}
      outputs:
        - {name: y, shape: [1], datatype: FP32, data: [3.0]}
    rtol: 1.0e-5
  register: smoke

- name: Also over gRPC, run by the color's runtime venv (it has grpcio)
  sovereign.mlops.smoke_test:
    url: http://127.0.0.1:8002
    model_name: iris
    grpc_target: 127.0.0.1:8202
    grpc_requests: 10
  vars:
    ansible_python_interpreter: /opt/sovereign/runtime/green/bin/python

- name: Show the figures
  ansible.builtin.debug:
    msg: "p50 {{ smoke.p50_ms }} ms, p99 {{ smoke.p99_ms }} ms over {{ smoke.requests }} requests"
"""

RETURN = r"""
url:
  description: The runtime that was tested.
  returned: always
  type: str
  sample: http://127.0.0.1:8002
requests:
  description: Measured inference requests sent (warm-up excluded).
  returned: always
  type: int
  sample: 20
failures:
  description: Measured or warm-up requests that failed (transport error, status, schema, golden or version).
  returned: always
  type: int
  sample: 0
p50_ms:
  description: Median latency of the successful measured requests, in milliseconds (null when none succeeded).
  returned: always
  type: float
  sample: 3.2
p95_ms:
  description: 95th percentile latency (nearest rank), in milliseconds.
  returned: always
  type: float
  sample: 4.8
p99_ms:
  description: 99th percentile latency (nearest rank), in milliseconds.
  returned: always
  type: float
  sample: 5.1
max_ms:
  description: Slowest successful measured request, in milliseconds.
  returned: always
  type: float
  sample: 5.1
model_version:
  description: The C(model_version) the responses reported (null when they carry none).
  returned: always
  type: str
  sample: "7"
golden_source:
  description: Where the golden example came from, C(inline), C(metadata), or null when none was found.
  returned: always
  type: str
  sample: metadata
checks:
  description: Every check, in order, with whether it passed and a detail (skipped checks have C(passed=null)).
  returned: always
  type: list
  elements: dict
  sample:
    - {name: status, passed: true, detail: "22 of 22 responses were 200"}
    - {name: latency_p99, passed: true, detail: "p99 5.1 ms <= 50 ms"}
grpc:
  description:
    - The gRPC checks' figures; null when O(grpc_target) is not given, or when the checks did not get to run
      (C(ready) or C(golden_source) failed).
  returned: always
  type: dict
  contains:
    target:
      description: The gRPC endpoint tested.
      type: str
      sample: 127.0.0.1:8202
    requests:
      description: C(ModelInfer) calls sent (0 when C(grpc_ready) failed).
      type: int
      sample: 5
    failures:
      description: Calls that failed (RPC error, schema, golden or version).
      type: int
      sample: 0
    p50_ms:
      description: Median latency of the successful calls, in milliseconds (null when none succeeded).
      type: float
      sample: 1.9
    p99_ms:
      description: 99th percentile latency (nearest rank) of the successful calls, in milliseconds.
      type: float
      sample: 2.4
    max_ms:
      description: Slowest successful call, in milliseconds.
      type: float
      sample: 2.4
"""

import json
import sys

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils._host_contract import http_url, runtime_colors
from ansible_collections.sovereign.mlops.plugins.module_utils._oip import (
    TRANSPORT_ERRORS,
    HTTPClient,
    URLError,
    check_golden,
    check_infer_response,
    compare_outputs,
    describe_transport_error,
    excerpt,
    feature_service_from_metadata,
    golden_from_metadata,
    percentile,
)
from ansible_collections.sovereign.mlops.plugins.module_utils._oip_grpc import (
    RPC_ERRORS,
    DecodeError,
    GRPCClient,
    describe_rpc_error,
    encode_model_infer_request,
    grpc,
)

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# Stop sending after this many consecutive transport failures (the runtime is gone).
MAX_CONSECUTIVE_TRANSPORT_FAILURES = 3


class Checks:
    """Ordered list of checks; the first failed one names the module's failure."""

    def __init__(self):
        self.items = []

    def add(self, name, passed, detail):
        self.items.append(dict(name=name, passed=passed, detail=detail))
        return passed

    def first_failure(self):
        for item in self.items:
            if item["passed"] is False:
                return item
        return None


class SmokeTest:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.url = self.p["url"].rstrip("/")
        self.model = self.p["model_name"]
        self.client = HTTPClient(self.url, timeout=self.p["timeout"], headers=self.p["headers"])
        self.checks = Checks()
        self.metadata = None  # the model metadata, when the golden example came from it
        self.result = dict(
            changed=False,
            url=self.url,
            model_name=self.model,
            requests=0,
            failures=0,
            p50_ms=None,
            p95_ms=None,
            p99_ms=None,
            max_ms=None,
            model_version=None,
            golden_source=None,
            grpc=None,
        )

    def finish(self):
        self.client.close()
        self.result["checks"] = self.checks.items
        failed = self.checks.first_failure()
        if failed:
            self.module.fail_json(
                msg="smoke test of {} (model {}) failed: {}: {}".format(
                    self.url, self.model, failed["name"], failed["detail"]
                ),
                **self.result,
            )
        self.module.exit_json(
            msg="smoke test of {} (model {}) passed {} checks".format(
                self.url, self.model, sum(1 for c in self.checks.items if c["passed"])
            ),
            **self.result,
        )

    def get_json(self, path):
        """``(status, parsed JSON or None, raw body)``; raises a TRANSPORT_ERRORS member."""
        status, _dummy, body, _dummy2 = self.client.request("GET", path)
        try:
            return status, json.loads(body.decode("utf-8")), body
        except ValueError:
            return status, None, body

    def check_ready(self):
        path = "/v2/health/ready"
        try:
            status, _dummy, body = self.get_json(path)
        except TRANSPORT_ERRORS as exc:
            return self.checks.add("ready", False, f"{self.url}{path} is unreachable ({describe_transport_error(exc)})")
        if status != 200:
            return self.checks.add(
                "ready", False, "{}{} answered {}: {}".format(self.url, path, status, excerpt(body) or "(empty body)")
            )
        return self.checks.add("ready", True, f"{self.url}{path} answered 200")

    def load_golden(self):
        if self.p["golden"] is not None:
            golden = self.p["golden"]
            error = check_golden(golden, "golden")
            if error:
                self.module.fail_json(msg=f"invalid golden option: {error}", **self.result)
            self.result["golden_source"] = "inline"
            self.checks.add("golden_source", True, "golden example given inline")
            return golden
        path = f"/v2/models/{self.model}"
        try:
            status, meta, body = self.get_json(path)
            self.metadata = meta
        except TRANSPORT_ERRORS as exc:
            self.checks.add(
                "golden_source",
                False,
                f"model metadata {self.url}{path} is unreachable ({describe_transport_error(exc)})",
            )
            return None
        if status != 200:
            self.checks.add(
                "golden_source",
                False,
                "model metadata {}{} answered {}: {}".format(self.url, path, status, excerpt(body) or "(empty body)"),
            )
            return None
        golden = golden_from_metadata(meta)
        if golden is None:
            self.checks.add(
                "golden_source",
                False,
                f"no golden option given and the model metadata {self.url}{path} has no "
                "parameters.golden; pass golden: {inputs: [...], outputs: [...]}",
            )
            return None
        if not isinstance(golden, dict):
            self.checks.add(
                "golden_source",
                False,
                f"the model metadata {self.url}{path} has parameters.golden = {golden!r}, not the golden example "
                "itself ({inputs, outputs}); pass golden: {inputs: [...], outputs: [...]}",
            )
            return None
        error = check_golden(golden, "parameters.golden")
        if error:
            self.checks.add("golden_source", False, f"model metadata {self.url}{path}: {error}")
            return None
        self.result["golden_source"] = "metadata"
        self.checks.add("golden_source", True, f"golden example read from {self.url}{path} parameters.golden")
        return golden

    def run(self):
        p = self.p
        if p["check_ready"] and not self.check_ready():
            return self.finish()
        golden = self.load_golden()
        if golden is None:
            return self.finish()

        rtol = p["rtol"] if p["rtol"] is not None else golden.get("rtol", DEFAULT_RTOL)
        atol = p["atol"] if p["atol"] is not None else golden.get("atol", DEFAULT_ATOL)
        expected_outputs = golden.get("outputs")
        body = json.dumps({"inputs": golden["inputs"]}).encode("utf-8")
        path = f"/v2/models/{self.model}/infer"

        first = dict(status=None, schema=None, golden=None, version=None)
        latencies = []
        versions = set()
        failures = 0
        sent = 0
        status_ok = 0
        consecutive_transport = 0
        aborted = None
        total = p["warmup"] + p["requests"]
        for index in range(total):
            measured = index >= p["warmup"]
            label = "request {}{}".format(index + 1, "" if measured else " (warm-up)")
            sent += 1
            try:
                status, _headers, raw, elapsed = self.client.request("POST", path, body=body)
            except TRANSPORT_ERRORS as exc:
                failures += 1
                consecutive_transport += 1
                if first["status"] is None:
                    first["status"] = f"{label} to {self.url}{path} failed: {describe_transport_error(exc)}"
                if consecutive_transport >= MAX_CONSECUTIVE_TRANSPORT_FAILURES:
                    aborted = index + 1
                    break
                continue
            consecutive_transport = 0
            if status != 200:
                failures += 1
                if first["status"] is None:
                    first["status"] = "{} answered {}: {}".format(label, status, excerpt(raw) or "(empty body)")
                continue
            status_ok += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except ValueError:
                obj = None
                error = "body is not JSON: %s" % (excerpt(raw) or "(empty)")
            else:
                error = check_infer_response(obj, self.model)
            if error:
                failures += 1
                if first["schema"] is None:
                    first["schema"] = f"{label}: {error}"
                continue
            ok = True
            if expected_outputs is not None:
                mismatch = compare_outputs(obj["outputs"], expected_outputs, rtol, atol)
                if mismatch:
                    ok = False
                    if first["golden"] is None:
                        first["golden"] = f"{label}: {mismatch}"
            version = obj.get("model_version")
            versions.add(version)
            if p["expect_model_version"] is not None and str(version) != p["expect_model_version"]:
                ok = False
                if first["version"] is None:
                    first["version"] = "{}: model_version is {}, expected {}".format(
                        label, "missing" if version is None else repr(version), p["expect_model_version"]
                    )
            if not ok:
                failures += 1
                continue
            if measured:
                latencies.append(elapsed * 1000.0)

        measured_sent = max(0, sent - p["warmup"])
        self.result["requests"] = measured_sent
        self.result["failures"] = failures
        known = sorted(str(v) for v in versions if v is not None)
        self.result["model_version"] = known[0] if len(known) == 1 else (", ".join(known) if known else None)

        # status
        if first["status"]:
            detail = first["status"]
            if aborted:
                detail += f" (stopped after {MAX_CONSECUTIVE_TRANSPORT_FAILURES} consecutive transport failures)"
            self.checks.add("status", False, detail)
        else:
            self.checks.add("status", True, f"{status_ok} of {sent} responses were 200")
        # schema
        if first["schema"]:
            self.checks.add("schema", False, first["schema"])
        elif status_ok:
            self.checks.add("schema", True, "every response is a well-formed OIP v2 inference response")
        else:
            self.checks.add("schema", None, "no response to check")
        # golden
        if expected_outputs is None:
            self.checks.add("golden", None, "skipped: the golden example has no outputs")
        elif first["golden"]:
            self.checks.add("golden", False, first["golden"])
        elif status_ok and not first["schema"]:
            self.checks.add("golden", True, f"{len(expected_outputs)} output(s) within rtol {rtol:g}, atol {atol:g}")
        else:
            self.checks.add("golden", None, "no well-formed response to compare")
        self.check_entity_golden(expected_outputs, rtol, atol)
        # model version
        if p["expect_model_version"] is not None:
            if first["version"]:
                self.checks.add("model_version", False, first["version"])
            elif status_ok and not first["schema"]:
                self.checks.add("model_version", True, "model_version is {}".format(p["expect_model_version"]))
            else:
                self.checks.add("model_version", None, "no well-formed response to check")
        # latency
        if latencies:
            figures = dict(p50=percentile(latencies, 50), p95=percentile(latencies, 95), p99=percentile(latencies, 99))
            for name in ("p50", "p95", "p99"):
                self.result[f"{name}_ms"] = round(figures[name], 3)
            self.result["max_ms"] = round(max(latencies), 3)
            for name in ("p50", "p95", "p99"):
                limit = p[f"max_{name}_ms"]
                if limit is None:
                    continue
                value = figures[name]
                self.checks.add(
                    f"latency_{name}",
                    value <= limit,
                    "{} {:.1f} ms {} {:g} ms over {} requests".format(
                        name, value, "<=" if value <= limit else ">", limit, len(latencies)
                    ),
                )
        else:
            self.checks.add("latency_p99", None, "no successful measured request to time")
        if p["grpc_target"]:
            self.check_grpc(golden, expected_outputs, rtol, atol)
        return self.finish()

    def check_grpc(self, golden, expected_outputs, rtol, atol):
        """grpc_ready, then grpc_infer: the golden inputs through ModelInfer, every answer checked as over HTTP."""
        p = self.p
        target = p["grpc_target"]
        figures = dict(target=target, requests=0, failures=0, p50_ms=None, p99_ms=None, max_ms=None)
        self.result["grpc"] = figures
        fix = (
            "check that the runtime listens for gRPC there (--grpc-port, SOVEREIGN_RUNTIME_GRPC_PORT; the "
            "inference_runtime role's inference_runtime_grpc_ports)"
        )
        client = GRPCClient(target, timeout=p["timeout"])
        try:
            step = "ServerReady"
            try:
                server_ready = client.server_ready()
                step = "ModelReady"
                model_ready = client.model_ready(self.model) if server_ready else None
            except RPC_ERRORS as exc:
                if step == "ServerReady":
                    detail = f"gRPC target {target} is unreachable or refused ({describe_rpc_error(exc)}); {fix}"
                else:
                    detail = (
                        f"gRPC target {target}: ModelReady of model {self.model!r} failed ({describe_rpc_error(exc)}); "
                        "is model_name the model this runtime serves?"
                    )
                self.checks.add("grpc_ready", False, detail)
                return self.checks.add("grpc_infer", None, "skipped: grpc_ready failed")
            except DecodeError as exc:
                self.checks.add(
                    "grpc_ready", False, f"gRPC target {target}: {step} answered something not OIP v2: {exc}"
                )
                return self.checks.add("grpc_infer", None, "skipped: grpc_ready failed")
            if not server_ready:
                self.checks.add(
                    "grpc_ready", False, f"gRPC target {target}: ServerReady is false (not ready yet, or draining)"
                )
                return self.checks.add("grpc_infer", None, "skipped: grpc_ready failed")
            if not model_ready:
                self.checks.add(
                    "grpc_ready",
                    False,
                    f"gRPC target {target}: ModelReady of model {self.model!r} is false (not loaded yet, or "
                    "another model); is model_name the model this runtime serves?",
                )
                return self.checks.add("grpc_infer", None, "skipped: grpc_ready failed")
            self.checks.add(
                "grpc_ready", True, f"gRPC target {target}: ServerReady and ModelReady of {self.model!r} true"
            )
            self._grpc_infer(client, figures, golden, expected_outputs, rtol, atol)
        finally:
            client.close()
        return None

    def _grpc_infer(self, client, figures, golden, expected_outputs, rtol, atol):
        p = self.p
        target = p["grpc_target"]
        try:
            request = encode_model_infer_request(self.model, golden["inputs"])
        except (ValueError, TypeError, OverflowError, KeyError) as exc:  # golden inputs a typed field cannot hold
            return self.checks.add("grpc_infer", False, f"the golden inputs cannot be sent over gRPC: {exc}")
        latencies = []
        first = None
        consecutive = 0
        stopped = ""
        for index in range(p["grpc_requests"]):
            label = f"gRPC call {index + 1} to {target}"
            figures["requests"] += 1
            try:
                obj, elapsed = client.model_infer(request)
            except RPC_ERRORS as exc:
                figures["failures"] += 1
                consecutive += 1
                first = first or f"{label} failed: {describe_rpc_error(exc)}"
                if consecutive >= MAX_CONSECUTIVE_TRANSPORT_FAILURES:
                    stopped = f", stopped after {consecutive} consecutive RPC failures"
                    break
                continue
            except DecodeError as exc:
                figures["failures"] += 1
                first = first or f"{label}: the answer is not a ModelInferResponse: {exc}"
                continue
            consecutive = 0
            error = check_infer_response(obj, self.model)
            if not error and expected_outputs is not None:
                error = compare_outputs(obj["outputs"], expected_outputs, rtol, atol)
            version = obj.get("model_version")
            if not error and p["expect_model_version"] is not None and str(version) != p["expect_model_version"]:
                error = "model_version is {}, expected {}".format(
                    "missing" if version is None else repr(version), p["expect_model_version"]
                )
            if error:
                figures["failures"] += 1
                first = first or f"{label}: {error}"
                continue
            latencies.append(elapsed * 1000.0)
        if latencies:
            figures["p50_ms"] = round(percentile(latencies, 50), 3)
            figures["p99_ms"] = round(percentile(latencies, 99), 3)
            figures["max_ms"] = round(max(latencies), 3)
        if first:
            return self.checks.add(
                "grpc_infer", False, f"{first} ({figures['failures']} of {figures['requests']} calls failed{stopped})"
            )
        what = "golden outputs" if expected_outputs is not None else "well-formed answers (no golden outputs)"
        return self.checks.add("grpc_infer", True, f"{figures['requests']} gRPC calls to {target}: {what}")

    def check_entity_golden(self, expected_outputs, rtol, atol):
        """The golden rows by entity key, when the runtime serves a feature service: features from its online store."""
        if self.result["golden_source"] != "metadata":  # inline golden outputs need not be the model's own rows
            return self.checks.add("entity_golden", None, "skipped: the golden example was given inline")
        service = feature_service_from_metadata(self.metadata)
        inputs = service.get("golden_entity_inputs") if service else None
        if not inputs or expected_outputs is None:
            why = "no feature service" if not service else "no golden rows by entity key"
            return self.checks.add("entity_golden", None, f"skipped: {why}")
        label = "entity-keyed request ({} {})".format(service.get("entity_key"), inputs[0].get("data"))
        try:
            status, _headers, raw, _elapsed = self.client.request(
                "POST", f"/v2/models/{self.model}/infer", body=json.dumps({"inputs": inputs}).encode("utf-8")
            )
        except TRANSPORT_ERRORS as exc:
            return self.checks.add("entity_golden", False, f"{label} failed: {describe_transport_error(exc)}")
        if status != 200:
            detail = "{} answered {} (feature service {}): {}".format(
                label, status, service["name"], excerpt(raw) or "(empty body)"
            )
            return self.checks.add("entity_golden", False, detail)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            return self.checks.add("entity_golden", False, f"{label}: body is not JSON: {excerpt(raw)}")
        error = check_infer_response(obj, self.model) or compare_outputs(obj["outputs"], expected_outputs, rtol, atol)
        if error:
            return self.checks.add("entity_golden", False, f"{label}: {error}")
        return self.checks.add(
            "entity_golden", True, f"{label} via feature service {service['name']}: golden outputs reproduced"
        )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str"),
            color=dict(type="str", choices=["blue", "green"]),
            contract=dict(type="dict"),
            model_name=dict(type="str", required=True),
            requests=dict(type="int", default=20),
            warmup=dict(type="int", default=2),
            timeout=dict(type="float", default=5.0),
            golden=dict(type="dict"),
            rtol=dict(type="float"),
            atol=dict(type="float"),
            max_p99_ms=dict(type="float", default=50.0),
            max_p95_ms=dict(type="float"),
            max_p50_ms=dict(type="float"),
            expect_model_version=dict(type="str"),
            check_ready=dict(type="bool", default=True),
            headers=dict(type="dict", default={}),
            grpc_target=dict(type="str"),
            grpc_requests=dict(type="int", default=5),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if p["url"] is None:
        spec = (runtime_colors(p["contract"]) or {}).get(p["color"]) if p["color"] else None
        if not spec or spec.get("port") is None:
            had = f"a contract without runtime.colors.{p['color']}" if p["contract"] else "no contract"
            module.fail_json(
                msg="give url, or color and a contract that has that color (contract: "
                '"{{ ansible_local.sovereign }}", published by the inference_runtime role); got no url, color '
                f"{p['color']!r} and {had}."
            )
        p["url"] = http_url(spec["host"], spec["port"])
    if p["requests"] < 1:
        module.fail_json(msg="requests must be >= 1, got {}".format(p["requests"]))
    if p["grpc_requests"] < 1:
        module.fail_json(msg="grpc_requests must be >= 1, got {}".format(p["grpc_requests"]))
    if p["grpc_target"] is not None:
        target = p["grpc_target"].strip()
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            module.fail_json(msg=f"grpc_target must be host:port, got {p['grpc_target']!r}")
        p["grpc_target"] = target
        if grpc is None:
            module.fail_json(
                msg=f"grpc_target is set but the Python running this module, {sys.executable}, cannot import grpc "
                "(grpcio): run the task with a Python that has grpcio, e.g. the color's runtime venv "
                "(vars: ansible_python_interpreter: <runtime venv>/bin/python, the host contract's "
                "runtime.colors.<color>.venv), or install grpcio for it, or leave grpc_target unset."
            )
    if p["warmup"] < 0:
        module.fail_json(msg="warmup must be >= 0, got {}".format(p["warmup"]))
    if p["timeout"] <= 0:
        module.fail_json(msg="timeout must be > 0, got {}".format(p["timeout"]))
    for name in ("rtol", "atol", "max_p99_ms", "max_p95_ms", "max_p50_ms"):
        if p[name] is not None and p[name] < 0:
            module.fail_json(msg=f"{name} must be >= 0, got {p[name]}")
    if "/" in p["model_name"] or not p["model_name"].strip():
        module.fail_json(msg="model_name must be a model name without '/', got {!r}".format(p["model_name"]))
    try:
        smoke = SmokeTest(module)
    except URLError as exc:
        module.fail_json(msg=f"url: {exc}", changed=False)
    smoke.run()


if __name__ == "__main__":
    main()
