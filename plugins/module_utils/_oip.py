# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Open Inference Protocol (KServe v2) client helpers for release checks.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

* :class:`HTTPClient`: one keep-alive ``http.client`` connection, reconnecting once when the server
  closed it, timing each request;
* :func:`http_get`: one-shot GET on a fresh connection (health probes, switch confirmation);
* :func:`check_infer_response` / :func:`compare_outputs`: OIP v2 response schema and golden outputs;
* :func:`percentile`: nearest-rank percentile (conservative: p99 of 20 samples is the maximum).
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import ssl
import time
from urllib.parse import quote, urlsplit

# Datatypes of the Open Inference Protocol (tensor data types). The runtime keeps the same set in
# runtime/src/sovereign_runtime/protocol.py (a separate package); tests/unit/runtime/test_oip_datatypes.py
# pins the two equal.
OIP_DATATYPES = frozenset(
    [
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "BF16",
        "FP32",
        "FP64",
        "BYTES",
    ]
)
_NUMERIC = OIP_DATATYPES - frozenset(["BOOL", "BYTES"])

# Errors raised by a request on a dead or unreachable connection.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, socket.timeout)


class URLError(ValueError):
    """A URL this module cannot use."""


def split_url(url):
    """``(scheme, host, port, base_path)`` of an http(s) URL; raises :class:`URLError`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise URLError(f"'{url}' is not an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise URLError(f"'{url}' has an invalid port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def describe_transport_error(exc):
    """Short, human text for a transport error (connection refused, timeout, ...)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "server closed the connection without answering"
    text = str(exc) or exc.__class__.__name__
    return text


class HTTPClient:
    """One keep-alive HTTP/1.1 connection to ``base_url`` (reconnects once if the server dropped it)."""

    def __init__(self, base_url, timeout=5.0, headers=None):
        self.scheme, self.host, self.port, self.base_path = split_url(base_url)
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.conn = None
        self.connections_opened = 0

    def _connect(self):
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self.connections_opened += 1
        return conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _once(self, method, path, body, headers):
        if self.conn is None:
            self.conn = self._connect()
            self.conn.connect()
            # Latency is measured per request: no Nagle delay on small requests.
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        self.conn.request(method, self.base_path + path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - start
        if resp.will_close:
            self.close()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), data, elapsed

    def request(self, method, path, body=None, headers=None):
        """``(status, headers (lower-case keys), body bytes, seconds)``; raises a TRANSPORT_ERRORS member.

        A request that fails on a reused connection (the server closed it while idle) is retried once on a
        fresh connection; a failure on a fresh connection is raised.
        """
        all_headers = dict(self.headers)
        all_headers.update(headers or {})
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        reused = self.conn is not None
        try:
            return self._once(method, path, body, all_headers)
        except TRANSPORT_ERRORS:
            self.close()
            if not reused:
                raise
        return self._once(method, path, body, all_headers)


def http_get(url, timeout=5.0, headers=None):
    """One GET on a fresh connection: ``(status, headers (lower-case keys), body bytes)``.

    Raises :class:`URLError` for a bad URL and a TRANSPORT_ERRORS member when the server is unreachable.
    """
    scheme, host, port, path = split_url(url)
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        query = urlsplit(url).query
        conn.request("GET", (path or "/") + ("?" + query if query else ""), headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    finally:
        conn.close()


def excerpt(body, limit=200):
    """First ``limit`` characters of a response body, for messages."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    body = " ".join(body.split())
    return body if len(body) <= limit else body[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------------


def flatten(data):
    """Row-major flattening of (possibly nested) tensor data."""
    if not isinstance(data, list):
        return [data]
    out = []
    stack = [iter(data)]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def product(shape):
    result = 1
    for dim in shape:
        result *= dim
    return result


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_tensor(tensor, where):
    """Schema error text for one OIP tensor (``name``, ``shape``, ``datatype``, ``data``), or None."""
    if not isinstance(tensor, dict):
        return f"{where} is not an object"
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        return f"{where} has no name"
    label = f"{where} '{name}'"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"{label}: shape must be a list of non-negative integers, got {shape!r}"
    datatype = tensor.get("datatype")
    if datatype not in OIP_DATATYPES:
        return f"{label}: datatype {datatype!r} is not an OIP datatype"
    if "data" not in tensor:
        return f"{label} has no data"
    values = flatten(tensor["data"])
    if len(values) != product(shape):
        return f"{label}: data has {len(values)} elements but shape {shape} needs {product(shape)}"
    if datatype in _NUMERIC and not all(_is_number(v) for v in values):
        return f"{label}: {datatype} data holds non-numeric values"
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
        return f"{label}: BOOL data holds non-boolean values"
    return None


def check_infer_response(obj, model_name):
    """Schema error text for an OIP v2 inference response, or None when it is well formed."""
    if not isinstance(obj, dict):
        return "response is not a JSON object"
    if obj.get("model_name") != model_name:
        return "model_name is {!r}, expected {!r}".format(obj.get("model_name"), model_name)
    outputs = obj.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return "outputs is missing or empty"
    for index, tensor in enumerate(outputs):
        error = check_tensor(tensor, f"output {index}")
        if error:
            return error
    return None


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)


def _close(got, expected, rtol, atol):
    if _is_number(expected) and _is_number(got):
        if isinstance(expected, float) and math.isnan(expected):
            return isinstance(got, float) and math.isnan(got)
        if isinstance(expected, float) and math.isinf(expected):
            return got == expected
        return abs(got - expected) <= atol + rtol * abs(expected)
    return got == expected


def compare_outputs(outputs, expected_outputs, rtol, atol):
    """First golden mismatch as text, or None. ``|got - expected| <= atol + rtol * |expected|`` per element
    (numpy.isclose); BOOL and BYTES must be equal. Outputs are matched by name; extra outputs are ignored."""
    by_name = dict((t.get("name"), t) for t in outputs if isinstance(t, dict))
    for expected in expected_outputs:
        name = expected.get("name")
        got = by_name.get(name)
        if got is None:
            return "golden output '{}' is missing from the response (outputs: {})".format(
                name, ", ".join(sorted(str(n) for n in by_name))
            )
        if "shape" in expected and list(got.get("shape") or []) != list(expected["shape"]):
            return "golden output mismatch for output '{}': shape {}, expected {}".format(
                name, got.get("shape"), expected["shape"]
            )
        if expected.get("datatype") and got.get("datatype") != expected["datatype"]:
            return "golden output mismatch for output '{}': datatype {}, expected {}".format(
                name, got.get("datatype"), expected["datatype"]
            )
        got_values = flatten(got.get("data"))
        exp_values = flatten(expected.get("data"))
        if len(got_values) != len(exp_values):
            return f"golden output mismatch for output '{name}': {len(got_values)} values, expected {len(exp_values)}"
        for index, (g, e) in enumerate(zip(got_values, exp_values, strict=False)):
            if not _close(g, e, rtol, atol):
                return (
                    f"golden output mismatch for output '{name}' at index {index}: got {_fmt(g)} expected {_fmt(e)} "
                    f"(rtol {rtol:g}, atol {atol:g})"
                )
    return None


def check_golden(golden, where):
    """Error text when ``golden`` is not ``{inputs: [tensors], outputs?: [tensors], rtol?, atol?}``, else None."""
    if not isinstance(golden, dict):
        return f"{where} must be a mapping {{inputs, outputs, rtol?, atol?}}"
    inputs = golden.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return f"{where}.inputs must be a non-empty list of OIP input tensors"
    for index, tensor in enumerate(inputs):
        error = check_tensor(tensor, f"{where}.inputs[{index}]")
        if error:
            return error
    outputs = golden.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            return f"{where}.outputs must be a list of OIP output tensors"
        for index, tensor in enumerate(outputs):
            if not isinstance(tensor, dict) or not tensor.get("name") or "data" not in tensor:
                return f"{where}.outputs[{index}] needs at least name and data"
    for key in ("rtol", "atol"):
        if key in golden and not (_is_number(golden[key]) and golden[key] >= 0):
            return f"{where}.{key} must be a non-negative number"
    return None


def golden_from_metadata(metadata):
    """``parameters.golden`` of an OIP model-metadata document (a mapping, or a JSON string), or None."""
    if not isinstance(metadata, dict):
        return None
    params = metadata.get("parameters")
    if not isinstance(params, dict):
        return None
    golden = params.get("golden")
    if isinstance(golden, str):
        try:
            golden = json.loads(golden)
        except ValueError:
            return golden
    return golden


def golden_request_body(golden, golden_file, client, model_name):
    """The JSON request body of the golden inference: GOLDEN, else GOLDEN_FILE, else the model metadata's
    ``parameters.golden`` (a mapping or a path) asked through CLIENT. Raises ValueError with the reason."""
    if golden is None and golden_file:
        try:
            with open(golden_file, encoding="utf-8") as handle:
                golden = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the golden file {golden_file}: {exc}") from None
    if golden is None:
        status, _headers, data, _seconds = client.request("GET", f"/v2/models/{quote(model_name)}")
        if status != 200:
            raise ValueError(f"the model metadata answered {status}: {excerpt(data)}")
        golden = golden_from_metadata(json.loads(data))
        if isinstance(golden, str) and golden.startswith("/"):
            return golden_request_body(None, golden, client, model_name)
    if not isinstance(golden, dict) or not golden.get("inputs"):
        raise ValueError("no golden example with inputs (parameters.golden of the model metadata)")
    return json.dumps({"inputs": golden["inputs"]}).encode()


def percentile(values, pct):
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def feature_service_from_metadata(metadata):
    """``parameters.feature_service`` of a runtime serving its model with a Feast feature service
    (``{name, entity_key, features, golden_entity_inputs?}``), or None."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("parameters"), dict):
        return None
    service = metadata["parameters"].get("feature_service")
    return service if isinstance(service, dict) and isinstance(service.get("name"), str) else None
