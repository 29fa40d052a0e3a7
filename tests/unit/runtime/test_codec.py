"""The JSON codec (orjson, ADR 1701) answers exactly what the standard library did: same accepted input,
same values, same error messages; numeric output that orjson would write as ``null`` is written as before."""

from __future__ import annotations

import json

import pytest
from sovereign_runtime.protocol import Decoder, RequestError, TensorSpec, dumps, dumps_outputs, loads

ODD_BUT_ACCEPTED = [
    b'{"data": [NaN, Infinity, -Infinity]}',  # the standard library takes these literals
    b'{"s": "\\ud800"}',  # a lone surrogate
    json.dumps({"a": [1.5, 2]}).encode("utf-16"),  # json.loads detects UTF-16/32 bodies
]
MALFORMED = [b'{"inputs": [', b"\xff\xfe\x00", b"", b"[1, 2", b'{"a": 1,}', b"[" * 100_000 + b"]" * 100_000]


@pytest.mark.parametrize("body", ODD_BUT_ACCEPTED)
def test_accepts_what_json_accepts(body):
    got, want = loads(body), json.loads(body)
    assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_input_gets_the_standard_library_error(body):
    try:
        json.loads(body)
    except (ValueError, RecursionError) as exc:
        want = (type(exc), str(exc))
    with pytest.raises((ValueError, RecursionError)) as got:
        loads(body)
    assert (got.type, str(got.value)) == want


def test_documents_parse_back_to_the_same_values():
    doc = {"error": "naïve ✓", "n": 2**70, 3: "int key", "f": [0.1, 1e-7, 1e300, -0.0], "b": True, "z": None}
    assert json.loads(dumps(doc)) == json.loads(json.dumps(doc))


def test_non_finite_outputs_are_written_as_before():
    outputs = [{"name": "out", "datatype": "FP32", "shape": [3], "data": [float("nan"), float("inf"), 1.0]}]
    assert dumps_outputs(outputs) == json.dumps(outputs, separators=(",", ":")).encode()
    finite = [{"name": "out", "datatype": "FP32", "shape": [2], "data": [0.5, 1.0]}]
    assert json.loads(dumps_outputs(finite)) == finite


def test_integers_past_64_bits_get_the_old_answer():
    """orjson reads them as floats ("must be integers"); the server still says what it said before ADR 1701."""
    dec = Decoder([TensorSpec("x", "INT64", (-1, 2))], None, batch_dim=True)
    body = b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 2], "data": [1, 1234567890123456789012]}]}'
    with pytest.raises(RequestError, match="list of INT64 values"):
        dec.decode(body)
    fine = dec.decode(body.replace(b"1234567890123456789012", b"9223372036854775807"))
    assert fine.tensors[0].tolist() == [[1, 2**63 - 1]]
