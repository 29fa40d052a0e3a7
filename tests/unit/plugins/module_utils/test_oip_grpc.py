# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The hand-written OIP v2 gRPC codec against protobuf itself: what it encodes, the runtime's generated module
(runtime/src/sovereign_runtime/oip_grpc/oip_v2_pb2.py) parses; what protobuf serializes, it decodes. Loaded from
its file alone (release_fixtures.harness.oip_pb2): protobuf is in the project venv, not the collection's needs."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _oip, _oip_grpc
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.release_fixtures.harness import oip_pb2

pb = oip_pb2()

# (datatype, flat values, typed-contents field (None: raw only), numpy dtype of the raw form)
TENSORS = [
    ("BOOL", [True, False, True], "bool_contents", np.bool_),
    ("UINT8", [0, 7, 255], "uint_contents", np.uint8),
    ("UINT16", [0, 65535], "uint_contents", np.uint16),
    ("UINT32", [0, 1, 2**32 - 1], "uint_contents", np.uint32),
    ("UINT64", [0, 2**63, 2**64 - 1], "uint64_contents", np.uint64),
    ("INT8", [-128, 0, 127], "int_contents", np.int8),
    ("INT16", [-32768, 5, 32767], "int_contents", np.int16),
    ("INT32", [-(2**31), -1, 2**31 - 1], "int_contents", np.int32),
    ("INT64", [-(2**63), -1, 0, 2**63 - 1], "int64_contents", np.int64),
    ("FP16", [1.5, -2.0, 65504.0], None, np.float16),
    ("BF16", [1.0, -2.5, 3.140625], None, None),
    ("FP32", [1.0, -2.5, 3.25, float("inf")], "fp32_contents", np.float32),
    ("FP64", [1e300, -0.1, 0.0], "fp64_contents", np.float64),
    ("BYTES", ["a", "", "héllo"], "bytes_contents", None),
]
IDS = [t[0] for t in TENSORS]


def _raw(datatype, values, dtype):
    """Raw contents as numpy (or the protocol's text) lays them out, independent of the codec."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
    if datatype == "BF16":
        return (np.array(values, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.array(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _typed(field, values):
    return [v.encode() for v in values] if field == "bytes_contents" else values


def _same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if isinstance(e, float) and math.isnan(e):
            assert math.isnan(g)
        else:
            assert g == e, (got, expected)


# ---------------------------------------------------------------------------------------------------------------
# hand codec -> protobuf
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("datatype", "values", "field", "dtype"), TENSORS, ids=IDS)
def test_request_protobuf_parses(datatype, values, field, dtype):
    inputs = [dict(name="x", datatype=datatype, shape=[1, len(values)], data=[values])]
    msg = pb.ModelInferRequest.FromString(
        _oip_grpc.encode_model_infer_request("m", inputs, model_version="3", request_id="r-1")
    )
    assert (msg.model_name, msg.model_version, msg.id) == ("m", "3", "r-1")
    (tensor,) = msg.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [1, len(values)])
    if field is None:  # FP16/BF16: no typed field, raw
        assert not tensor.HasField("contents")
        assert list(msg.raw_input_contents) == [_raw(datatype, values, dtype)]
    else:
        assert not msg.raw_input_contents
        assert [f.name for f, _value in tensor.contents.ListFields()] == [field]
        _same(list(getattr(tensor.contents, field)), _typed(field, values))


def test_request_one_raw_input_makes_every_input_raw():
    inputs = [
        dict(name="a", datatype="FP32", shape=[2], data=[1.0, 2.0]),
        dict(name="b", datatype="FP16", shape=[1], data=[0.5]),
        dict(name="c", datatype="BYTES", shape=[1], data=["z"]),
    ]
    msg = pb.ModelInferRequest.FromString(_oip_grpc.encode_model_infer_request("m", inputs))
    assert [t.name for t in msg.inputs] == ["a", "b", "c"]
    assert not any(t.HasField("contents") for t in msg.inputs)
    assert list(msg.raw_input_contents) == [
        struct.pack("<2f", 1.0, 2.0),
        struct.pack("<e", 0.5),
        b"\x01\x00\x00\x00z",
    ]


EMPTY = [
    ("empty-fp32", dict(name="x", datatype="FP32", shape=[0, 4], data=[])),
    ("empty-bytes", dict(name="x", datatype="BYTES", shape=[0], data=[])),
    ("scalar", dict(name="x", datatype="INT64", shape=[], data=[-5])),
]


@pytest.mark.parametrize("tensor", [c[1] for c in EMPTY], ids=[c[0] for c in EMPTY])
def test_request_empty_and_scalar(tensor):
    msg = pb.ModelInferRequest.FromString(_oip_grpc.encode_model_infer_request("m", [tensor]))
    (got,) = msg.inputs
    assert list(got.shape) == tensor["shape"]
    field = _oip_grpc.CONTENTS_FIELD[tensor["datatype"]]
    _same(list(getattr(got.contents, field)), _typed(field, tensor["data"]))
    assert msg.model_version == "" and msg.id == ""


READY_REQUESTS = [("name-only", "m", ""), ("name-version", "m", "7"), ("unicode", "modèle", "v1")]


@pytest.mark.parametrize(("name", "version"), [c[1:] for c in READY_REQUESTS], ids=[c[0] for c in READY_REQUESTS])
def test_model_ready_request(name, version):
    msg = pb.ModelReadyRequest.FromString(_oip_grpc.encode_model_ready_request(name, version))
    assert (msg.name, msg.version) == (name, version)
    assert pb.ServerReadyRequest.FromString(_oip_grpc.encode_server_ready_request()) == pb.ServerReadyRequest()


VARINTS = [0, 1, 127, 128, 300, 2**32, 2**63, 2**64 - 1, -1, -(2**63)]


@pytest.mark.parametrize("value", VARINTS, ids=[str(v) for v in VARINTS])
def test_varint_round_trip(value):
    encoded = _oip_grpc.encode_varint(value)
    assert len(encoded) <= 10
    got, pos = _oip_grpc.decode_varint(encoded, 0)
    assert pos == len(encoded)
    assert got == value % 2**64


# ---------------------------------------------------------------------------------------------------------------
# protobuf -> hand codec
# ---------------------------------------------------------------------------------------------------------------


def _response(datatype, values, field, dtype, raw):
    msg = pb.ModelInferResponse(model_name="m", model_version="7", id="r-1")
    out = msg.outputs.add(name="y", datatype=datatype, shape=[len(values)])
    if raw:
        msg.raw_output_contents.append(_raw(datatype, values, dtype))
    else:
        getattr(out.contents, field).extend(_typed(field, values))
    return msg


RESPONSE_CASES = [(t, raw) for t in TENSORS for raw in (False, True) if raw or t[2] is not None]


@pytest.mark.parametrize(
    ("tensor", "raw"), RESPONSE_CASES, ids=["{}-{}".format(t[0], "raw" if r else "typed") for t, r in RESPONSE_CASES]
)
def test_response_decodes(tensor, raw):
    datatype, values, field, dtype = tensor
    got = _oip_grpc.decode_model_infer_response(_response(datatype, values, field, dtype, raw).SerializeToString())
    assert (got["model_name"], got["model_version"], got["id"]) == ("m", "7", "r-1")
    (out,) = got["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", datatype, [len(values)])
    expected = values
    if datatype == "FP32" and not raw:
        expected = [float(np.float32(v)) for v in values]
    _same(out["data"], expected)
    # the HTTP JSON shape: the collection's response checks apply unchanged
    assert _oip.check_infer_response(got, "m") is None
    assert _oip.compare_outputs(got["outputs"], [dict(name="y", datatype=datatype, data=values)], 1e-3, 0) is None


def test_response_empty_tensors_and_defaults():
    msg = pb.ModelInferResponse(model_name="m")
    msg.outputs.add(name="a", datatype="FP32", shape=[0, 3])
    msg.outputs.add(name="b", datatype="BYTES", shape=[0])
    got = _oip_grpc.decode_model_infer_response(msg.SerializeToString())
    assert got == dict(
        model_name="m",
        outputs=[
            dict(name="a", datatype="FP32", shape=[0, 3], data=[]),
            dict(name="b", datatype="BYTES", shape=[0], data=[]),
        ],
    )
    assert "model_version" not in got  # proto3's empty string: absent, as in a JSON answer without one
    raw = pb.ModelInferResponse(model_name="m")
    raw.outputs.add(name="a", datatype="FP16", shape=[0])
    raw.raw_output_contents.append(b"")
    assert _oip_grpc.decode_model_infer_response(raw.SerializeToString())["outputs"][0]["data"] == []


def test_response_several_raw_outputs_in_order():
    msg = pb.ModelInferResponse(model_name="m", model_version="2")
    msg.outputs.add(name="p", datatype="FP32", shape=[2])
    msg.outputs.add(name="label", datatype="INT64", shape=[2])
    msg.outputs.add(name="tag", datatype="BYTES", shape=[1])
    msg.raw_output_contents.extend([struct.pack("<2f", 0.25, 0.75), struct.pack("<2q", -1, 3), b"\x02\x00\x00\x00ok"])
    got = _oip_grpc.decode_model_infer_response(msg.SerializeToString())
    assert [(o["name"], o["data"]) for o in got["outputs"]] == [
        ("p", [0.25, 0.75]),
        ("label", [-1, 3]),
        ("tag", ["ok"]),
    ]


def _unknown_fields():
    """One field of each wire type (0, 1, 2, 5) with numbers no message here uses."""
    return (
        _oip_grpc.encode_varint(100 << 3 | 0)
        + _oip_grpc.encode_varint(2**40)
        + _oip_grpc.encode_varint(101 << 3 | 1)
        + b"\x01" * 8
        + _oip_grpc.encode_varint(102 << 3 | 2)
        + b"\x03abc"
        + _oip_grpc.encode_varint(103 << 3 | 5)
        + b"\x02" * 4
    )


def test_unknown_fields_are_skipped_at_every_level():
    unknown = _unknown_fields()
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0]).SerializeToString() + unknown
    tensor = (
        pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=[2]).SerializeToString()
        + unknown
        + _oip_grpc._len_field(5, contents)
    )
    msg = pb.ModelInferResponse(model_name="m", model_version="7")
    msg.parameters["sequence_id"].int64_param = 9  # a known field the codec does not read (the map, field 4)
    body = unknown + msg.SerializeToString() + _oip_grpc._len_field(5, tensor) + unknown
    assert pb.ModelInferResponse.FromString(body).outputs[0].contents.fp32_contents == [1.0, 2.0]  # valid protobuf
    got = _oip_grpc.decode_model_infer_response(body)
    assert got == dict(
        model_name="m", model_version="7", outputs=[dict(name="y", datatype="FP32", shape=[2], data=[1.0, 2.0])]
    )
    ready = unknown + pb.ServerReadyResponse(ready=True).SerializeToString() + unknown
    assert _oip_grpc.decode_server_ready_response(ready) is True
    assert _oip_grpc.decode_model_ready_response(unknown) is False


READY = [
    ("server-true", pb.ServerReadyResponse(ready=True), _oip_grpc.decode_server_ready_response, True),
    ("server-false", pb.ServerReadyResponse(ready=False), _oip_grpc.decode_server_ready_response, False),
    ("model-true", pb.ModelReadyResponse(ready=True), _oip_grpc.decode_model_ready_response, True),
    ("model-false", pb.ModelReadyResponse(), _oip_grpc.decode_model_ready_response, False),
]


@pytest.mark.parametrize(("msg", "decode", "expected"), [c[1:] for c in READY], ids=[c[0] for c in READY])
def test_ready_responses(msg, decode, expected):
    assert decode(msg.SerializeToString()) is expected


def test_unpacked_repeated_scalars_are_read():
    """protobuf parsers accept a repeated scalar packed or not; so does the codec (shape and contents here)."""
    contents = b"".join(_oip_grpc._key(3, 0) + _oip_grpc.encode_varint(v) for v in (-4, 5))
    tensor = (
        _oip_grpc._string_field(1, "y")
        + _oip_grpc._string_field(2, "INT64")
        + _oip_grpc._key(3, 0)
        + b"\x02"
        + _oip_grpc._len_field(5, contents)
    )
    body = _oip_grpc._string_field(1, "m") + _oip_grpc._len_field(5, tensor)
    assert pb.ModelInferResponse.FromString(body).outputs[0].contents.int64_contents == [-4, 5]
    assert _oip_grpc.decode_model_infer_response(body)["outputs"] == [
        dict(name="y", datatype="INT64", shape=[2], data=[-4, 5])
    ]


def _raw_response(datatype, shape, raws, n_outputs=1):
    msg = pb.ModelInferResponse(model_name="m")
    for i in range(n_outputs):
        msg.outputs.add(name=f"y{i}", datatype=datatype, shape=shape)
    msg.raw_output_contents.extend(raws)
    return msg.SerializeToString()


ERRORS = [
    ("truncated-varint", b"\x08", "truncated varint"),
    ("length-past-end", b"\x0a\x05ab", "runs past the message's end"),
    ("group-wire-type", b"\x0b", "wire type 3"),
    ("field-zero", b"\x00\x01", "field number 0"),
    ("truncated-fixed32", b"\x0d\x01", "truncated 32-bit"),
    ("raw-size", _raw_response("FP32", [2], [b"\x00" * 4]), "has 4 bytes, the shape needs 2 x 4 of FP32"),
    ("raw-count", _raw_response("FP32", [1], [b"\x00" * 4], n_outputs=2), "1 entries for 2 outputs"),
    ("raw-bytes-past-end", _raw_response("BYTES", [1], [b"\x09\x00\x00\x00ab"]), "runs past the end"),
    (
        "raw-bytes-count",
        _raw_response("BYTES", [2], [b"\x01\x00\x00\x00a"]),
        "holds 1 BYTES elements, the shape needs 2",
    ),
    ("raw-unknown-datatype", _raw_response("FP8", [1], [b"\x00"]), "'FP8' is not an OIP datatype"),
    ("model-name-not-utf8", b"\x0a\x01\xff", "model_name is not UTF-8"),
]


@pytest.mark.parametrize(("body", "fragment"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_decode_errors(body, fragment):
    with pytest.raises(_oip_grpc.DecodeError, match=None) as info:
        _oip_grpc.decode_model_infer_response(body)
    assert fragment in str(info.value)


def test_describe_rpc_error():
    grpc = pytest.importorskip("grpc")

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "failed to connect to all addresses"

    assert _oip_grpc.describe_rpc_error(Failed()) == "UNAVAILABLE: failed to connect to all addresses"
    assert _oip_grpc.describe_rpc_error(grpc.RpcError()) == "RpcError"
    assert (grpc.RpcError,) == _oip_grpc.RPC_ERRORS
