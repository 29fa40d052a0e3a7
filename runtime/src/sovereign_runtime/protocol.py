"""Open Inference Protocol v2 (KServe / Triton) JSON: datatypes, request decoding and validation, response encoding.

Everything a client sends is checked here, before it reaches the model; every problem becomes a
:class:`RequestError` carrying a 4xx status and a message that names the offending field.
"""

from __future__ import annotations

import ctypes
import json
from array import array
from dataclasses import dataclass
from math import prod
from typing import Any

import orjson
import torch

# Every datatype of the Open Inference Protocol. The collection keeps the same set for its smoke test and
# release checks (plugins/module_utils/_oip.py, a separate package); tests/unit/runtime/test_oip_datatypes.py
# pins the two equal, so a model this server serves never fails the deploy's schema check.
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

# OIP datatype name -> torch dtype: what this server serves. BYTES (strings) is not supported by a tensor model.
OIP_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3 has them (limited op support)
    if hasattr(torch, _name):
        OIP_TO_TORCH[_name.upper()] = getattr(torch, _name)
TORCH_TO_OIP: dict[torch.dtype, str] = {v: k for k, v in OIP_TO_TORCH.items()}
# Bytes per element of each datatype served (raw tensors: binary extension, gRPC raw contents).
ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in OIP_TO_TORCH.items()}

# numpy / MLflow signature dtype names -> OIP.
NUMPY_TO_OIP = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "str": "BYTES",
    "object": "BYTES",
}

_INT_KINDS = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
# Flat numeric data converts ~3x faster through array.array + torch.frombuffer than torch.tensor(list),
# and integer arrays refuse floats and out-of-range values by themselves.
_ARRAY_CODES = {
    k: code
    for k, code, size in (
        ("FP32", "f", 4),
        ("FP64", "d", 8),
        ("INT8", "b", 1),
        ("UINT8", "B", 1),
        ("INT16", "h", 2),
        ("INT32", "i", 4),
        ("INT64", "q", 8),
    )
    if array(code).itemsize == size
}
_encode = json.JSONEncoder(separators=(",", ":")).encode
_fast_dumps = orjson.dumps
_fast_loads = orjson.loads
_FAST_OPTS = orjson.OPT_NON_STR_KEYS  # int dict keys become strings, as with the standard library


class RequestError(Exception):
    """A client error: answered with ``status`` and ``{"error": message}``, never a 500."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` uses -1 for a free dimension; ``None`` means unknown."""

    name: str
    datatype: str
    shape: tuple[int, ...] | None

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape) if self.shape else [-1]}


def dumps(obj: Any) -> bytes:
    """Compact JSON (orjson, ADR 1701). What orjson refuses (integers past 64 bits) the standard library
    encodes, so the answer never depends on the codec."""
    try:
        return _fast_dumps(obj, option=_FAST_OPTS)
    except TypeError:
        return _encode(obj).encode()


def dumps_outputs(outputs: list[dict[str, Any]]) -> bytes:
    """Output tensors as JSON. orjson writes NaN and +-Infinity as ``null``; the standard library (and so
    this server before ADR 1701) writes ``NaN``/``Infinity``: a ``null`` in numeric output means one of
    them, and the body is encoded the old way."""
    body = dumps(outputs)
    if b"null" in body:
        return _encode(outputs).encode()
    return body


def _std_loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("request body is not valid JSON: nested too deeply") from None


def loads(body: bytes | str) -> Any:
    """Parse JSON: orjson, and for anything it refuses the standard library's verdict, value or error (it
    also takes NaN/Infinity literals, integers past 64 bits, lone surrogates, UTF-16/32 bodies), so
    parse errors are exactly those of ``json.loads``. Integers past 64 bits come back as floats: a caller
    whose verdict depends on them re-reads with ``json.loads`` (``Decoder.decode`` does)."""
    try:
        return _fast_loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def error_body(message: str, **extra: Any) -> bytes:
    return dumps({"error": message, **extra})


@dataclass(slots=True)
class DecodedRequest:
    id: str | None
    tensors: list[torch.Tensor]  # in model input order
    rows: int  # size of the batch dimension (1 when the model has no batch dimension)
    outputs: list[str] | None  # output names asked for, None = all
    binary: frozenset[str] | None = None  # outputs to answer as raw bytes (binary tensor extension), None = none


class Decoder:
    """Validates OIP infer requests against a model's input specs and turns them into tensors."""

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec] | None,
        batch_dim: bool,
    ) -> None:
        self.inputs = inputs
        self.index = {spec.name: i for i, spec in enumerate(inputs)}
        self.output_names = {spec.name for spec in outputs} if outputs else None
        self.batch_dim = batch_dim
        self._plans: dict[bytes, _Plan] = {}  # binary requests: JSON header bytes -> what it decodes to

    def decode(self, body: bytes, header_length: bytes | None = None) -> DecodedRequest:
        """``header_length``: the ``Inference-Header-Content-Length`` header (binary tensor extension): the
        JSON document is that many leading bytes of ``body``, raw input tensors follow it."""
        if header_length is not None:
            return self._decode_binary(body, header_length)
        try:
            req = _fast_loads(body)
        except orjson.JSONDecodeError:
            return self.validate(_std_loads(body))
        try:
            return self.validate(req)
        except RequestError:
            # orjson reads integers past 64 bits as floats: the standard library's reading has the last word,
            # so a refused request gets exactly the answer it got before ADR 1701.
            return self.validate(_std_loads(body))

    def _decode_binary(self, body: bytes, header_length: bytes) -> DecodedRequest:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise RequestError(
                f"Inference-Header-Content-Length {header_length[:40].decode('latin-1')!r} must be an integer"
                f" between 0 and the body's {len(body)} bytes"
            )
        head = body[:n]
        plan = self._plans.get(head)
        if plan is not None and plan.size == len(body) - n:
            return plan.decode(body, n)
        raw = _Raw(body, n)
        try:
            doc = _fast_loads(head)
        except orjson.JSONDecodeError:
            doc = _std_loads(head)
        req = self.validate(doc, raw)
        if raw.offset != len(body):
            raise RequestError(
                f"binary data: {len(body) - n} byte(s) follow the JSON header, the inputs' binary_data_size"
                f" add up to {raw.offset - n}"
            )
        if plan is None and n <= _PLAN_MAX_HEADER and req.id is None:
            plan = _Plan.of(doc, req, self.index)
            if plan is not None:
                if len(self._plans) >= _PLANS_KEPT:
                    self._plans.clear()
                self._plans[head] = plan
        return req

    def validate(self, req: Any, raw: _Raw | None = None) -> DecodedRequest:
        """A parsed request document -> tensors, or RequestError. ``raw``: the binary part of the body."""
        if type(req) is not dict:
            raise RequestError("request body must be a JSON object with an 'inputs' list")
        items = req.get("inputs")
        if type(items) is not list or not items:
            raise RequestError("'inputs' must be a non-empty list of tensors")
        req_id = req.get("id")
        if req_id is not None and type(req_id) is not str:
            raise RequestError("'id' must be a string")
        specs = self.inputs
        if len(items) != len(specs):
            expected = ", ".join(repr(s.name) for s in specs)
            raise RequestError(f"model expects {len(specs)} input(s) ({expected}), request has {len(items)}")
        tensors: list[torch.Tensor | None] = [None] * len(specs)
        rows = -1
        for item in items:
            idx, tensor = self._tensor(item, raw)
            if tensors[idx] is not None:
                raise RequestError(f"input {specs[idx].name!r} given more than once")
            tensors[idx] = tensor
            if self.batch_dim:
                n = tensor.shape[0]
                if rows == -1:
                    rows = n
                elif n != rows:
                    raise RequestError(f"inputs disagree on the batch dimension ({rows} vs {n})")
        if self.batch_dim:
            if rows < 1:
                raise RequestError("the batch dimension (shape[0]) must be at least 1")
        else:
            rows = 1
        wanted = req.get("outputs")
        outputs = self._outputs(wanted) if wanted is not None else None
        params = req.get("parameters")
        binary = binary_outputs(params, wanted) if params is not None or wanted is not None else None
        return DecodedRequest(req_id, tensors, rows, outputs, binary)  # type: ignore[arg-type]

    def _tensor(self, item: Any, raw: _Raw | None = None) -> tuple[int, torch.Tensor]:
        if type(item) is not dict:
            raise RequestError("each input must be an object with name, shape, datatype and data")
        name = item.get("name")
        if type(name) is not str:
            raise RequestError("input 'name' must be a string")
        idx = self.index.get(name)
        if idx is None:
            known = ", ".join(repr(n) for n in self.index)
            raise RequestError(f"unknown input {name!r}; the model takes {known}")
        spec = self.inputs[idx]
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            if datatype not in OIP_TO_TORCH:
                what = "unsupported" if datatype in OIP_DATATYPES else "unknown"
                raise RequestError(f"input {name!r}: {what} datatype {datatype!r}")
            if spec.datatype:  # "" = the model did not say: any numeric datatype
                raise RequestError(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
        shape = item.get("shape")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
        want = spec.shape
        if want is not None:
            if len(shape) != len(want):
                raise RequestError(f"input {name!r}: shape {shape} has rank {len(shape)}, the model wants {list(want)}")
            for got, exp in zip(shape, want, strict=True):
                if exp != -1 and got != exp:
                    raise RequestError(f"input {name!r}: shape {shape} does not match the model's {list(want)}")
        elif self.batch_dim and not shape:
            raise RequestError(f"input {name!r}: shape must have a batch dimension")
        params = item.get("parameters")
        if params is not None and type(params) is dict and "binary_data_size" in params:
            return idx, _binary_tensor(raw, params["binary_data_size"], name, datatype, shape)
        data = item.get("data")
        if type(data) is not list:
            raise RequestError(f"input {name!r}: 'data' must be a list")
        count = prod(shape)
        dtype = OIP_TO_TORCH[datatype]
        code = _ARRAY_CODES.get(datatype)
        try:
            if code is not None and data:
                try:
                    flat = array(code, data)
                except (TypeError, OverflowError):  # nested lists, or bad values: the general path decides
                    tensor = _general_tensor(data, datatype, dtype)
                else:
                    if len(flat) != count:
                        raise RequestError(f"data has {len(flat)} element(s), shape {shape} needs {count}")
                    # flat and contiguous: a view, cheaper than reshape
                    return idx, torch.frombuffer(flat, dtype=dtype).view(shape)
            else:
                tensor = _general_tensor(data, datatype, dtype)
        except RequestError as exc:
            raise RequestError(f"input {name!r}: {exc.message}") from None
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise RequestError(f"input {name!r}: 'data' must be a (flat or nested) list of {datatype} values") from None
        if tensor.numel() != count:
            raise RequestError(f"input {name!r}: data has {tensor.numel()} element(s), shape {shape} needs {count}")
        return idx, tensor.reshape(shape)

    def _outputs(self, outputs: Any) -> list[str]:
        if type(outputs) is not list:
            raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
        names = []
        for out in outputs:
            name = out.get("name") if type(out) is dict else None
            if type(name) is not str:
                raise RequestError("each requested output must be an object with a string 'name'")
            if self.output_names is not None and name not in self.output_names:
                raise RequestError(f"unknown output {name!r}; the model has {sorted(self.output_names)}")
            names.append(name)
        return names


class _Raw:
    """The binary part of a request body (after the JSON header), consumed input by input."""

    __slots__ = ("buf", "offset")

    def __init__(self, body: bytes, offset: int) -> None:
        self.buf = bytearray(body)  # writable: torch.frombuffer shares it without a warning
        self.offset = offset


# A client sends the same JSON header with every request of one shape (tritonclient does, unless it sets an
# id): what a header decodes to is kept, so such a request costs a dict lookup and one frombuffer per input
# instead of a JSON parse and a validation. Headers with an id (unique per request) are not kept; the set is
# bounded (cleared when full), and so are the headers kept.
_PLANS_KEPT = 256
_PLAN_MAX_HEADER = 4096


class _Plan:
    """What one binary request header decodes to: the inputs' places in the raw part, rows, outputs asked."""

    __slots__ = ("binary", "inputs", "n_inputs", "outputs", "rows", "size")

    def __init__(self, inputs: list[tuple], n_inputs: int, rows: int, outputs: Any, binary: Any, size: int) -> None:
        self.inputs = inputs  # (model input index, dtype, element count, offset in the raw part, shape)
        self.n_inputs = n_inputs
        self.rows = rows
        self.outputs = outputs
        self.binary = binary
        self.size = size  # bytes of the raw part

    @classmethod
    def of(cls, doc: dict, req: DecodedRequest, index: dict[str, int]) -> _Plan | None:
        """The plan of a header that has just decoded to ``req``; None when a request with that header is not
        all raw tensors (JSON data in the header: kept out, simpler) or has a BOOL input (checked per request)."""
        inputs = []
        offset = 0
        for item in doc["inputs"]:
            params = item.get("parameters")
            if type(params) is not dict or "binary_data_size" not in params:
                return None
            idx = index[item["name"]]
            tensor = req.tensors[idx]
            if tensor.dtype is torch.bool:
                return None
            inputs.append((idx, tensor.dtype, tensor.numel(), offset, tuple(tensor.shape)))
            offset += params["binary_data_size"]
        return cls(inputs, len(req.tensors), req.rows, req.outputs, req.binary, offset)

    def decode(self, body: bytes, n: int) -> DecodedRequest:
        buf = bytearray(body)  # writable: torch.frombuffer shares it without a warning
        tensors: list[Any] = [None] * self.n_inputs
        for idx, dtype, count, offset, shape in self.inputs:
            tensors[idx] = (
                torch.frombuffer(buf, dtype=dtype, count=count, offset=n + offset).view(shape)
                if count
                else torch.empty(shape, dtype=dtype)
            )
        return DecodedRequest(None, tensors, self.rows, self.outputs, self.binary)


def _binary_tensor(raw: _Raw | None, size: Any, name: str, datatype: str, shape: list[int]) -> torch.Tensor:
    """An input sent as raw little-endian bytes (binary tensor extension): ``binary_data_size`` bytes, the
    next ones after the previous binary input."""
    if raw is None:
        raise RequestError(
            f"input {name!r}: binary_data_size needs the binary tensor extension: send the JSON header's length"
            " in an Inference-Header-Content-Length header, the raw tensor bytes after it"
        )
    dtype = OIP_TO_TORCH[datatype]
    count = prod(shape)
    itemsize = ITEMSIZE[datatype]
    if type(size) is not int or size != count * itemsize:
        raise RequestError(
            f"input {name!r}: binary_data_size {size!r}, shape {shape} of {datatype} needs {count * itemsize} bytes"
        )
    start = raw.offset
    if start + size > len(raw.buf):
        raise RequestError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
    raw.offset = start + size
    if not count:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(raw.buf, dtype=torch.uint8 if dtype is torch.bool else dtype, count=count, offset=start)
    if dtype is torch.bool:
        if tensor.max().item() > 1:
            raise RequestError(f"input {name!r}: BOOL data must be bytes 0 or 1")
        tensor = tensor.view(torch.bool)
    return tensor.view(shape)  # frombuffer's tensor is flat and contiguous: a view, cheaper than reshape


ALL_OUTPUTS = frozenset(["*"])  # DecodedRequest.binary: every output as raw bytes


def binary_outputs(params: Any, wanted: Any) -> frozenset[str] | None:
    """Which outputs the request wants as raw bytes: request ``parameters.binary_data_output`` (all of them,
    what tritonclient asks when it names no outputs) and per-output ``parameters.binary_data``."""
    every = type(params) is dict and params.get("binary_data_output") is True
    if type(wanted) is not list:
        return ALL_OUTPUTS if every else None
    names = set()
    for out in wanted:
        p = out.get("parameters") if type(out) is dict else None
        flag = p.get("binary_data") if type(p) is dict else None
        if flag is True or (every and flag is None):
            names.add(out["name"])
    return frozenset(names) if names else None


def encode_binary(
    prefix: bytes, specs: list[TensorSpec], tensors: list[torch.Tensor], wanted: list[str] | None, binary: frozenset
) -> tuple[bytes, int]:
    """A binary-extension response: (JSON header + raw output bytes, length of the JSON header). ``prefix`` is
    the response document's opening (model name, version, id)."""
    outs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    every = binary is ALL_OUTPUTS
    for spec, tensor in zip(specs, tensors, strict=False):
        if wanted is not None and spec.name not in wanted:
            continue
        if every or spec.name in binary:
            data = raw_bytes(tensor)
            chunks.append(data)
            outs.append(
                {
                    "name": spec.name,
                    "datatype": TORCH_TO_OIP.get(tensor.dtype, spec.datatype),
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            )
        else:
            outs.extend(encode_outputs([spec], [tensor], None))
    head = b"".join((prefix, b',"outputs":', dumps_outputs(outs), b"}"))
    return head + b"".join(chunks), len(head)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as raw little-endian bytes (row-major)."""
    t = tensor.contiguous()
    size = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), size) if size else b""


class BinaryEncoder:
    """Binary-extension answers for one model's outputs. The JSON header's outputs part depends only on the
    layout (each output's datatype and shape, which outputs are asked for and which as raw bytes): it is made
    once per layout and kept, so an answer is its id, that part and the raw bytes. A layout with an output
    asked for as JSON data is not kept (``encode_binary`` answers it)."""

    KEPT = 256

    def __init__(self, specs: list[TensorSpec]) -> None:
        self.specs = specs
        self._layouts: dict[tuple, tuple[bytes, tuple[int, ...]] | None] = {}

    def layout(
        self, metas: tuple, rows: int | None, wanted: list[str] | None, binary: frozenset
    ) -> tuple[bytes, tuple[int, ...]] | None:
        """(JSON of ``,"outputs":[...]}``, the indices of the outputs sent raw) for outputs of ``metas``
        ((dtype, shape) each; with ``rows``, the shape after the batch dimension), or None (not all raw)."""
        key = (metas, rows, None if wanted is None else tuple(wanted), binary)
        try:
            return self._layouts[key]
        except KeyError:
            pass
        every = binary is ALL_OUTPUTS
        outs: list[dict[str, Any]] = []
        sent: list[int] = []
        made: tuple[bytes, tuple[int, ...]] | None = None
        for i, (spec, (dtype, shape)) in enumerate(zip(self.specs, metas, strict=False)):
            if wanted is not None and spec.name not in wanted:
                continue
            if not (every or spec.name in binary):
                break
            full = [rows, *shape] if rows is not None else list(shape)
            size = prod(full) * dtype.itemsize
            outs.append(
                {
                    "name": spec.name,
                    "datatype": TORCH_TO_OIP.get(dtype, spec.datatype),
                    "shape": full,
                    "parameters": {"binary_data_size": size},
                }
            )
            sent.append(i)
        else:
            made = (b"".join((b',"outputs":', dumps_outputs(outs), b"}")), tuple(sent))
        if len(self._layouts) >= self.KEPT:
            self._layouts.clear()
        self._layouts[key] = made
        return made

    def encode(
        self, prefix: bytes, tensors: list[torch.Tensor], wanted: list[str] | None, binary: frozenset
    ) -> tuple[bytes, int]:
        """What ``encode_binary(prefix, specs, tensors, wanted, binary)`` returns."""
        made = self.layout(tuple((t.dtype, tuple(t.shape)) for t in tensors), None, wanted, binary)
        if made is None:
            return encode_binary(prefix, self.specs, tensors, wanted, binary)
        head, sent = made
        return b"".join((prefix, head, *[raw_bytes(tensors[i]) for i in sent])), len(prefix) + len(head)

    def encode_rows(
        self,
        prefix: bytes,
        metas: tuple,
        raws: list[tuple[bytes, int]],
        start: int,
        stop: int,
        wanted: list[str] | None,
        binary: frozenset,
    ) -> tuple[bytes, int] | None:
        """The answer for rows ``start:stop`` of a batch's outputs, from the batch's raw bytes (``raws``: each
        output's bytes and bytes per row; ``metas``: (dtype, shape after the batch dimension) each), or None
        when an output is asked for as JSON data."""
        made = self.layout(metas, stop - start, wanted, binary)
        if made is None:
            return None
        head, sent = made
        chunks = [prefix, head]
        for i in sent:
            data, per_row = raws[i]
            chunks.append(data[start * per_row : stop * per_row])
        return b"".join(chunks), len(prefix) + len(head)


def _general_tensor(data: list, datatype: str, dtype: torch.dtype) -> torch.Tensor:
    if datatype in _INT_KINDS or datatype == "BOOL":
        return _exact_tensor(data, datatype, dtype)
    return torch.tensor(data, dtype=dtype)


def _exact_tensor(data: list, datatype: str, dtype: torch.dtype) -> torch.Tensor:
    """Integer and boolean tensors: refuse floats (no silent truncation) and out-of-range values."""
    tensor = torch.tensor(data)
    if datatype == "BOOL":
        if tensor.numel() and tensor.dtype is not torch.bool:
            raise RequestError("BOOL data must be true/false")
        return tensor.to(torch.bool)
    if tensor.numel() == 0:
        return tensor.to(dtype)
    if tensor.dtype is not torch.int64:
        raise RequestError(f"{datatype} data must be integers")
    info = torch.iinfo(dtype)
    if tensor.min().item() < info.min or tensor.max().item() > info.max:
        raise RequestError(f"{datatype} data out of range [{info.min}, {info.max}]")
    return tensor.to(dtype)


def encode_outputs(
    specs: list[TensorSpec], tensors: list[torch.Tensor], wanted: list[str] | None
) -> list[dict[str, Any]]:
    out = []
    for spec, tensor in zip(specs, tensors, strict=False):
        if wanted is not None and spec.name not in wanted:
            continue
        out.append(
            {
                "name": spec.name,
                "datatype": TORCH_TO_OIP.get(tensor.dtype, spec.datatype),
                "shape": list(tensor.shape),
                "data": tensor.reshape(-1).tolist(),
            }
        )
    return out


def tensor_from_json(item: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """An OIP tensor object (as in a golden file) to (name, tensor), with the same checks as requests."""
    if type(item) is not dict or type(item.get("name")) is not str:
        raise RequestError("each tensor must be an object with a string 'name'")
    dec = Decoder([TensorSpec(item["name"], "", None)], None, batch_dim=False)
    _, tensor = dec._tensor(item)
    return item["name"], tensor
