# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) for release checks.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise.

A hand-written protobuf wire codec for exactly the messages the smoke test needs (ServerReady, ModelReady,
ModelInfer; field numbers of runtime/src/sovereign_runtime/oip_grpc/oip_v2.proto), so the collection needs no
``protobuf`` package and no generated code (docs/adr/1725-smoke-test-grpc.md). Only ``grpcio`` is needed, and only
when a gRPC check runs: it is imported optionally (``grpc`` is None without it). Calls go through
``channel.unary_unary`` on bytes.

Decoded inference responses have the shape of the HTTP JSON ones (``model_name``, ``model_version``, ``id``,
``outputs`` of ``name``/``datatype``/``shape``/``data``, data flat), so ``_oip.check_infer_response`` and
``_oip.compare_outputs`` apply unchanged.
"""

from __future__ import annotations

import struct
import time

from ansible_collections.sovereign.mlops.plugins.module_utils._oip import flatten

try:
    import grpc
except ImportError:
    grpc = None

SERVICE = "/inference.GRPCInferenceService/"

# The exceptions a call raises (a refused or failed RPC); () without grpcio, which catches nothing.
RPC_ERRORS = (grpc.RpcError,) if grpc is not None else ()

_MASK64 = (1 << 64) - 1

# Wire types.
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5

# InferTensorContents: field number and scalar kind of each typed-contents field.
_CONTENTS = {
    "bool_contents": (1, "bool"),
    "int_contents": (2, "int32"),
    "int64_contents": (3, "int64"),
    "uint_contents": (4, "uint32"),
    "uint64_contents": (5, "uint64"),
    "fp32_contents": (6, "float"),
    "fp64_contents": (7, "double"),
    "bytes_contents": (8, "bytes"),
}
_CONTENTS_BY_NUMBER = dict((number, (name, kind)) for name, (number, kind) in _CONTENTS.items())

# The typed-contents field of each OIP datatype. FP16 and BF16 have none: raw contents only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Little-endian struct format of one element of each fixed-size datatype in raw contents (BF16: see _bf16).
_RAW_FORMAT = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "BF16": "H",
    "FP32": "f",
    "FP64": "d",
}


class DecodeError(ValueError):
    """Bytes that are not the message they should be."""


# ---------------------------------------------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------------------------------------------


def encode_varint(value):
    """Base-128 varint; a negative value is its 64-bit two's complement (10 bytes), as protobuf writes int32/int64."""
    value &= _MASK64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf, pos):
    """``(value, next position)`` of the varint at ``pos`` (unsigned, at most 64 bits)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _signed64(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _key(number, wire):
    return encode_varint(number << 3 | wire)


def _len_field(number, payload):
    return _key(number, LEN) + encode_varint(len(payload)) + payload


def _string_field(number, text):
    """A string field; proto3 leaves an empty string out."""
    return _len_field(number, text.encode("utf-8")) if text else b""


def iter_fields(buf):
    """``(field number, wire type, value)`` of each field of a message: an int for a varint, bytes otherwise.

    Fields of any number are returned, so callers skip those they do not know (wire types 0, 1, 2 and 5; groups,
    deprecated and never used by this protocol, are an error)."""
    buf = memoryview(buf)
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = decode_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == VARINT:
            value, pos = decode_varint(buf, pos)
        elif wire == FIXED64:
            if pos + 8 > end:
                raise DecodeError(f"truncated 64-bit field {number}")
            value, pos = bytes(buf[pos : pos + 8]), pos + 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise DecodeError(f"truncated 32-bit field {number}")
            value, pos = bytes(buf[pos : pos + 4]), pos + 4
        elif wire == LEN:
            size, pos = decode_varint(buf, pos)
            if pos + size > end:
                raise DecodeError(f"field {number}: length {size} runs past the message's end")
            value, pos = bytes(buf[pos : pos + size]), pos + size
        else:
            raise DecodeError(f"field {number} has wire type {wire}, which this protocol does not use")
        yield number, wire, value


def _string(value, wire, what):
    if wire != LEN:
        raise DecodeError(f"{what} has wire type {wire}, expected a length-delimited string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not UTF-8") from None


def _bool(value, wire, what):
    if wire != VARINT:
        raise DecodeError(f"{what} has wire type {wire}, expected a varint")
    return bool(value)


# Packed repeated scalars: protobuf writes them packed (one length-delimited field) and must read either form.
def _scalar(kind, value):
    if kind == "bool":
        return bool(value)
    if kind == "int32":
        return _signed64(value)  # int32 is written sign-extended to 64 bits
    if kind == "int64":
        return _signed64(value)
    if kind == "uint32":
        return value & 0xFFFFFFFF
    if kind == "uint64":
        return value
    if kind == "float":
        return struct.unpack("<f", value)[0]
    if kind == "double":
        return struct.unpack("<d", value)[0]
    return value


_WIRE_OF_KIND = dict(
    bool=VARINT, int32=VARINT, int64=VARINT, uint32=VARINT, uint64=VARINT, float=FIXED32, double=FIXED64
)


def _repeated(kind, wire, value, out, what):
    """Append one occurrence of a repeated scalar field (packed or not) to ``out``."""
    element_wire = _WIRE_OF_KIND[kind]
    if wire == element_wire:
        out.append(_scalar(kind, value))
        return
    if wire != LEN:
        raise DecodeError(f"{what} has wire type {wire}")
    if element_wire == VARINT:
        pos = 0
        while pos < len(value):
            item, pos = decode_varint(value, pos)
            out.append(_scalar(kind, item))
        return
    size = 4 if element_wire == FIXED32 else 8
    if len(value) % size:
        raise DecodeError(f"packed {what} has {len(value)} bytes, not a multiple of {size}")
    fmt = "<{}{}".format(len(value) // size, "f" if size == 4 else "d")
    out.extend(struct.unpack(fmt, value))


def _packed_field(number, kind, values):
    if not values:
        return b""
    if kind in ("float", "double"):
        payload = struct.pack("<{}{}".format(len(values), "f" if kind == "float" else "d"), *values)
    else:
        payload = b"".join(encode_varint(int(v)) for v in values)
    return _len_field(number, payload)


# ---------------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------------


def _to_bytes(value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _from_bytes(value):
    """BYTES elements come out as text, as in the HTTP JSON answers; bytes that are not UTF-8 stay bytes."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _bf16_from_float(value):
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if (bits & 0x7F800000) == 0x7F800000 and bits & 0x7FFFFF:  # NaN stays a (quiet) NaN
        return (bits >> 16) | 0x40
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even


def _float_from_bf16(half):
    return struct.unpack("<f", struct.pack("<I", half << 16))[0]


def encode_raw(datatype, values):
    """Raw (little-endian) contents of a tensor's flat ``values``; BYTES elements get 4-byte length prefixes."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (_to_bytes(v) for v in values))
    fmt = _RAW_FORMAT.get(datatype)
    if fmt is None:
        raise ValueError(f"datatype {datatype!r} is not an OIP datatype")
    if datatype == "BF16":
        values = [_bf16_from_float(float(v)) for v in values]
    elif datatype in ("FP16", "FP32", "FP64"):
        values = [float(v) for v in values]
    return struct.pack(f"<{len(values)}{fmt}", *values)


def decode_raw(datatype, raw, count, what="raw contents"):
    """The flat values of ``count`` elements of ``datatype`` in raw contents; raises DecodeError on a size mismatch."""
    if datatype == "BYTES":
        values = []
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise DecodeError(f"{what}: truncated BYTES length prefix at byte {pos}")
            (size,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + size > len(raw):
                raise DecodeError(f"{what}: BYTES element {len(values)} of {size} bytes runs past the end")
            values.append(_from_bytes(bytes(raw[pos : pos + size])))
            pos += size
        if len(values) != count:
            raise DecodeError(f"{what} holds {len(values)} BYTES elements, the shape needs {count}")
        return values
    fmt = _RAW_FORMAT.get(datatype)
    if fmt is None:
        raise DecodeError(f"{what}: datatype {datatype!r} is not an OIP datatype")
    size = struct.calcsize("<" + fmt)
    if len(raw) != count * size:
        raise DecodeError(f"{what} has {len(raw)} bytes, the shape needs {count} x {size} of {datatype}")
    values = list(struct.unpack(f"<{count}{fmt}", raw))
    if datatype == "BF16":
        return [_float_from_bf16(v) for v in values]
    return values


def _encode_contents(datatype, values):
    field = CONTENTS_FIELD[datatype]
    number, kind = _CONTENTS[field]
    if kind == "bytes":
        return b"".join(_len_field(number, _to_bytes(v)) for v in values)
    if kind == "bool":
        values = [bool(v) for v in values]
    return _packed_field(number, kind, values)


def _decode_contents(buf):
    """``{field name: [values]}`` of an InferTensorContents message (unknown fields skipped)."""
    out = {}
    for number, wire, value in iter_fields(buf):
        known = _CONTENTS_BY_NUMBER.get(number)
        if known is None:
            continue
        name, kind = known
        values = out.setdefault(name, [])
        if kind == "bytes":
            if wire != LEN:
                raise DecodeError(f"contents.{name} has wire type {wire}")
            values.append(_from_bytes(value))
        else:
            _repeated(kind, wire, value, values, f"contents.{name}")
    return out


def _product(shape):
    result = 1
    for dim in shape:
        result *= dim
    return result


# ---------------------------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------------------------


def encode_server_ready_request():
    return b""


def _decode_ready(buf, message):
    """``ready`` (field 1) of a ServerReadyResponse or a ModelReadyResponse, named ``message`` in errors."""
    ready = False
    for number, wire, value in iter_fields(buf):
        if number == 1:
            ready = _bool(value, wire, message + ".ready")
    return ready


def decode_server_ready_response(buf):
    """``ready`` of a ServerReadyResponse."""
    return _decode_ready(buf, "ServerReadyResponse")


def encode_model_ready_request(name, version=""):
    return _string_field(1, name) + _string_field(2, version or "")


def decode_model_ready_response(buf):
    """``ready`` of a ModelReadyResponse."""
    return _decode_ready(buf, "ModelReadyResponse")


def encode_model_infer_request(model_name, inputs, model_version="", request_id=""):
    """A ModelInferRequest of OIP input tensors (``name``, ``datatype``, ``shape``, ``data`` as in the HTTP JSON).

    Data goes in the datatype's typed ``contents`` field; when one input is FP16 or BF16 (no typed field) every
    input goes in ``raw_input_contents`` instead (the protocol allows no mix)."""
    raw = any(t["datatype"] not in CONTENTS_FIELD for t in inputs)
    out = [_string_field(1, model_name), _string_field(2, model_version or ""), _string_field(3, request_id or "")]
    raws = []
    for tensor in inputs:
        datatype = tensor["datatype"]
        values = flatten(tensor["data"])
        body = [
            _string_field(1, tensor["name"]),
            _string_field(2, datatype),
            _packed_field(3, "int64", list(tensor["shape"])),
        ]
        if raw:
            raws.append(encode_raw(datatype, values))
        else:
            body.append(_len_field(5, _encode_contents(datatype, values)))
        out.append(_len_field(5, b"".join(body)))
    out.extend(_len_field(7, r) for r in raws)
    return b"".join(out)


def _decode_output_tensor(buf, index):
    tensor = dict(name="", datatype="", shape=[])
    contents = {}
    for number, wire, value in iter_fields(buf):
        what = f"output {index}"
        if number == 1:
            tensor["name"] = _string(value, wire, what + " name")
        elif number == 2:
            tensor["datatype"] = _string(value, wire, what + " datatype")
        elif number == 3:
            _repeated("int64", wire, value, tensor["shape"], what + " shape")
        elif number == 5:
            if wire != LEN:
                raise DecodeError(f"{what} contents has wire type {wire}")
            for name, values in _decode_contents(value).items():  # a message field seen twice is merged
                contents.setdefault(name, []).extend(values)
    return tensor, contents


def decode_model_infer_response(buf):
    """A ModelInferResponse as the HTTP JSON answer's dict: ``model_name``, ``model_version`` and ``id`` (left out
    when empty), ``outputs`` with flat ``data`` from ``raw_output_contents`` (one entry per output, in order) or
    else from each output's typed contents. Raises DecodeError."""
    result = dict(model_name="")
    tensors = []
    raws = []
    for number, wire, value in iter_fields(buf):
        if number == 1:
            result["model_name"] = _string(value, wire, "model_name")
        elif number == 2:
            result["model_version"] = _string(value, wire, "model_version")
        elif number == 3:
            result["id"] = _string(value, wire, "id")
        elif number == 5:
            if wire != LEN:
                raise DecodeError(f"outputs has wire type {wire}")
            tensors.append(_decode_output_tensor(value, len(tensors)))
        elif number == 6:
            if wire != LEN:
                raise DecodeError(f"raw_output_contents has wire type {wire}")
            raws.append(value)
    for key in ("model_version", "id"):
        if not result.get(key):
            result.pop(key, None)
    if raws and len(raws) != len(tensors):
        raise DecodeError(f"raw_output_contents has {len(raws)} entries for {len(tensors)} outputs")
    outputs = []
    for index, (tensor, contents) in enumerate(tensors):
        if raws:
            tensor["data"] = decode_raw(
                tensor["datatype"],
                raws[index],
                _product(tensor["shape"]),
                "output {0} '{1}': raw_output_contents[{0}]".format(index, tensor["name"]),
            )
        else:
            field = CONTENTS_FIELD.get(tensor["datatype"])
            tensor["data"] = contents.get(field, []) if field else []
        outputs.append(tensor)
    result["outputs"] = outputs
    return result


# ---------------------------------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------------------------------


def describe_rpc_error(exc):
    """``CODE: details`` of a failed call (grpc.RpcError), e.g. ``UNAVAILABLE: failed to connect to all addresses``."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    try:
        code = code() if callable(code) else code
        details = details() if callable(details) else details
    except Exception:  # pylint: disable=broad-except  # a bare RpcError carries neither
        code = details = None
    name = getattr(code, "name", None) or (str(code) if code is not None else exc.__class__.__name__)
    return f"{name}: {details}" if details else name


def _identity(data):
    return data


class GRPCClient:
    """One insecure (cleartext HTTP/2) channel to ``target`` (``host:port``); each call has ``timeout`` seconds."""

    def __init__(self, target, timeout=5.0):
        if grpc is None:
            raise RuntimeError("grpcio is not importable")
        self.target = target
        self.timeout = timeout
        # No proxy: the target is a host's own runtime port, never reached through http_proxy.
        self.channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
        self._calls = dict(
            (
                name,
                self.channel.unary_unary(SERVICE + name, request_serializer=_identity, response_deserializer=_identity),
            )
            for name in ("ServerReady", "ModelReady", "ModelInfer")
        )

    def close(self):
        self.channel.close()

    def _call(self, name, request):
        return self._calls[name](request, timeout=self.timeout)

    def server_ready(self):
        """ServerReady's answer; raises an RPC_ERRORS member or DecodeError."""
        return decode_server_ready_response(self._call("ServerReady", encode_server_ready_request()))

    def model_ready(self, name, version=""):
        """ModelReady's answer; raises an RPC_ERRORS member or DecodeError."""
        return decode_model_ready_response(self._call("ModelReady", encode_model_ready_request(name, version)))

    def model_infer(self, request):
        """``(decoded response, seconds)`` of one ModelInfer call with the encoded ``request`` (seconds: from
        sending to the whole answer, before decoding); raises an RPC_ERRORS member or DecodeError."""
        start = time.perf_counter()
        answer = self._call("ModelInfer", request)
        elapsed = time.perf_counter() - start
        return decode_model_infer_response(answer), elapsed
