# -*- coding: utf-8 -*-
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
from urllib.parse import urlsplit

# Datatypes of the Open Inference Protocol (tensor data types).
OIP_DATATYPES = frozenset([
    'BOOL', 'UINT8', 'UINT16', 'UINT32', 'UINT64', 'INT8', 'INT16', 'INT32', 'INT64',
    'FP16', 'FP32', 'FP64', 'BYTES',
])
_NUMERIC = OIP_DATATYPES - frozenset(['BOOL', 'BYTES'])

# Errors raised by a request on a dead or unreachable connection.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, socket.timeout)


class URLError(ValueError):
    """A URL this module cannot use."""


def split_url(url):
    """``(scheme, host, port, base_path)`` of an http(s) URL; raises :class:`URLError`."""
    parts = urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise URLError("'%s' is not an http:// or https:// URL with a host" % url)
    try:
        port = parts.port or (443 if parts.scheme == 'https' else 80)
    except ValueError:
        raise URLError("'%s' has an invalid port" % url) from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip('/')


def describe_transport_error(exc):
    """Short, human text for a transport error (connection refused, timeout, ...)."""
    if isinstance(exc, ConnectionRefusedError):
        return 'connection refused'
    if isinstance(exc, socket.timeout):
        return 'timed out'
    if isinstance(exc, http.client.RemoteDisconnected):
        return 'server closed the connection without answering'
    text = str(exc) or exc.__class__.__name__
    return text


class HTTPClient(object):
    """One keep-alive HTTP/1.1 connection to ``base_url`` (reconnects once if the server dropped it)."""

    def __init__(self, base_url, timeout=5.0, headers=None):
        self.scheme, self.host, self.port, self.base_path = split_url(base_url)
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.conn = None
        self.connections_opened = 0

    def _connect(self):
        if self.scheme == 'https':
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
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
            all_headers.setdefault('Content-Type', 'application/json')
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
    if scheme == 'https':
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        query = urlsplit(url).query
        conn.request('GET', (path or '/') + ('?' + query if query else ''), headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    finally:
        conn.close()


def excerpt(body, limit=200):
    """First ``limit`` characters of a response body, for messages."""
    if isinstance(body, bytes):
        body = body.decode('utf-8', 'replace')
    body = ' '.join(body.split())
    return body if len(body) <= limit else body[:limit] + '...'


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
        return '%s is not an object' % where
    name = tensor.get('name')
    if not isinstance(name, str) or not name:
        return '%s has no name' % where
    label = "%s '%s'" % (where, name)
    shape = tensor.get('shape')
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return '%s: shape must be a list of non-negative integers, got %r' % (label, shape)
    datatype = tensor.get('datatype')
    if datatype not in OIP_DATATYPES:
        return '%s: datatype %r is not an OIP datatype' % (label, datatype)
    if 'data' not in tensor:
        return '%s has no data' % label
    values = flatten(tensor['data'])
    if len(values) != product(shape):
        return '%s: data has %d elements but shape %s needs %d' % (label, len(values), shape, product(shape))
    if datatype in _NUMERIC and not all(_is_number(v) for v in values):
        return '%s: %s data holds non-numeric values' % (label, datatype)
    if datatype == 'BOOL' and not all(isinstance(v, bool) for v in values):
        return '%s: BOOL data holds non-boolean values' % label
    return None


def check_infer_response(obj, model_name):
    """Schema error text for an OIP v2 inference response, or None when it is well formed."""
    if not isinstance(obj, dict):
        return 'response is not a JSON object'
    if obj.get('model_name') != model_name:
        return 'model_name is %r, expected %r' % (obj.get('model_name'), model_name)
    outputs = obj.get('outputs')
    if not isinstance(outputs, list) or not outputs:
        return 'outputs is missing or empty'
    for index, tensor in enumerate(outputs):
        error = check_tensor(tensor, 'output %d' % index)
        if error:
            return error
    return None


def _fmt(value):
    if isinstance(value, float):
        return '%.6g' % value
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
    by_name = dict((t.get('name'), t) for t in outputs if isinstance(t, dict))
    for expected in expected_outputs:
        name = expected.get('name')
        got = by_name.get(name)
        if got is None:
            return "golden output '%s' is missing from the response (outputs: %s)" % (
                name, ', '.join(sorted(str(n) for n in by_name)))
        if 'shape' in expected and list(got.get('shape') or []) != list(expected['shape']):
            return "golden output mismatch for output '%s': shape %s, expected %s" % (
                name, got.get('shape'), expected['shape'])
        if expected.get('datatype') and got.get('datatype') != expected['datatype']:
            return "golden output mismatch for output '%s': datatype %s, expected %s" % (
                name, got.get('datatype'), expected['datatype'])
        got_values = flatten(got.get('data'))
        exp_values = flatten(expected.get('data'))
        if len(got_values) != len(exp_values):
            return "golden output mismatch for output '%s': %d values, expected %d" % (
                name, len(got_values), len(exp_values))
        for index, (g, e) in enumerate(zip(got_values, exp_values)):
            if not _close(g, e, rtol, atol):
                return "golden output mismatch for output '%s' at index %d: got %s expected %s (rtol %g, atol %g)" % (
                    name, index, _fmt(g), _fmt(e), rtol, atol)
    return None


def check_golden(golden, where):
    """Error text when ``golden`` is not ``{inputs: [tensors], outputs?: [tensors], rtol?, atol?}``, else None."""
    if not isinstance(golden, dict):
        return '%s must be a mapping {inputs, outputs, rtol?, atol?}' % where
    inputs = golden.get('inputs')
    if not isinstance(inputs, list) or not inputs:
        return '%s.inputs must be a non-empty list of OIP input tensors' % where
    for index, tensor in enumerate(inputs):
        error = check_tensor(tensor, '%s.inputs[%d]' % (where, index))
        if error:
            return error
    outputs = golden.get('outputs')
    if outputs is not None:
        if not isinstance(outputs, list):
            return '%s.outputs must be a list of OIP output tensors' % where
        for index, tensor in enumerate(outputs):
            if not isinstance(tensor, dict) or not tensor.get('name') or 'data' not in tensor:
                return '%s.outputs[%d] needs at least name and data' % (where, index)
    for key in ('rtol', 'atol'):
        if key in golden and not (_is_number(golden[key]) and golden[key] >= 0):
            return '%s.%s must be a non-negative number' % (where, key)
    return None


def golden_from_metadata(metadata):
    """``parameters.golden`` of an OIP model-metadata document (a mapping, or a JSON string), or None."""
    if not isinstance(metadata, dict):
        return None
    params = metadata.get('parameters')
    if not isinstance(params, dict):
        return None
    golden = params.get('golden')
    if isinstance(golden, str):
        try:
            golden = json.loads(golden)
        except ValueError:
            return golden
    return golden


def percentile(values, pct):
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(math.ceil(pct / 100.0 * len(ordered))))
    return ordered[min(rank, len(ordered)) - 1]
