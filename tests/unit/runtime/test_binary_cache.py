"""The binary tensor extension's two caches (protocol.py): a request header's decoding (``Decoder._plans``:
the same JSON header, byte for byte, decodes the same way) and a response layout's JSON
(``BinaryEncoder``). Each is checked against the uncached path it stands in for: same tensors, same bytes,
same errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from sovereign_runtime.protocol import (
    ALL_OUTPUTS,
    BinaryEncoder,
    Decoder,
    RequestError,
    TensorSpec,
    encode_binary,
)

INPUTS = [TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "INT64", (-1, 2))]


def decoder() -> Decoder:
    return Decoder(INPUTS, [TensorSpec("y", "FP32", (-1, 3))], batch_dim=True)


def body_of(doc: dict, raw: bytes) -> tuple[bytes, bytes]:
    head = json.dumps(doc).encode()
    return head + raw, str(len(head)).encode()


def raw_inputs(rows: int, seed: float) -> tuple[dict, bytes]:
    a = [seed + i / 8 for i in range(rows * 4)]
    b = [int(seed) * 100 + i for i in range(rows * 2)]
    raw = struct.pack(f"<{len(a)}f", *a) + struct.pack(f"<{len(b)}q", *b)
    inputs = [
        {"name": "a", "datatype": "FP32", "shape": [rows, 4], "parameters": {"binary_data_size": rows * 16}},
        {"name": "b", "datatype": "INT64", "shape": [rows, 2], "parameters": {"binary_data_size": rows * 16}},
    ]
    return {"inputs": inputs}, raw


def same(x, y) -> bool:
    return (
        x.id == y.id
        and x.rows == y.rows
        and x.outputs == y.outputs
        and x.binary == y.binary
        and all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(x.tensors, y.tensors, strict=True))
    )


DOCS = [
    ("no outputs named", lambda doc: doc),
    ("every output raw", lambda doc: {**doc, "parameters": {"binary_data_output": True}}),
    ("one output raw", lambda doc: {**doc, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}),
    ("inputs in another order", lambda doc: {"inputs": doc["inputs"][::-1]}),
]


@pytest.mark.parametrize(("case", "shape_doc"), DOCS, ids=[c[0] for c in DOCS])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_kept_header_decodes_as_a_fresh_one(case, shape_doc, rows):
    dec = decoder()
    for seed in (1.0, 2.0, 3.0):  # the same header, other raw bytes each time
        doc, raw = raw_inputs(rows, seed)
        doc = shape_doc(doc)
        if case == "inputs in another order":  # the raw part follows the header's order
            half = len(raw) // 2
            raw = raw[half:] + raw[:half]
        body, n = body_of(doc, raw)
        got = dec.decode(body, n)
        assert same(got, decoder().decode(body, n))
        assert got.tensors[0][0, 0].item() == pytest.approx(seed)
    assert len(dec._plans) == 1


def test_headers_not_kept():
    """A header with an id (unique per request), or with JSON data in it, is decoded every time."""
    dec = decoder()
    doc, raw = raw_inputs(1, 1.0)
    for i in range(3):
        body, n = body_of({**doc, "id": f"r{i}"}, raw)
        assert dec.decode(body, n).id == f"r{i}"
    mixed = {"inputs": [doc["inputs"][0], {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [7, 8]}]}
    body, n = body_of(mixed, raw[:16])
    assert dec.decode(body, n).tensors[1].tolist() == [[7, 8]]
    assert dec._plans == {}


@pytest.mark.parametrize(
    ("cut", "words"), [(-8, "past the end"), (8, "add up to 32")], ids=["too short", "bytes left over"]
)
def test_a_kept_header_with_the_wrong_raw_size_gets_the_fresh_error(cut, words):
    dec = decoder()
    doc, raw = raw_inputs(1, 1.0)
    dec.decode(*body_of(doc, raw))
    assert len(dec._plans) == 1
    bad = raw[:cut] if cut < 0 else raw + bytes(cut)
    errors = []
    for d in (dec, decoder()):
        with pytest.raises(RequestError) as exc:
            d.decode(*body_of(doc, bad))
        errors.append(exc.value.message)
    assert errors[0] == errors[1] and words in errors[0]


def test_kept_headers_are_bounded():
    dec = decoder()
    for rows in range(1, 301):
        dec.decode(*body_of(*raw_inputs(rows, 1.0)))
        assert len(dec._plans) <= 256
    assert len(dec._plans) >= 1


OUT_SPECS = [TensorSpec("p", "FP32", (-1, 3)), TensorSpec("q", "INT64", (-1, 2))]
BATCH = [torch.arange(15, dtype=torch.float32).reshape(5, 3) / 7, torch.arange(10).reshape(5, 2) * 3]

LAYOUTS = [
    ("every output", None, ALL_OUTPUTS),
    ("both named", ["p", "q"], frozenset(["p", "q"])),
    ("one named", ["q"], frozenset(["q"])),
    ("one of two raw", ["p", "q"], frozenset(["p"])),  # q as JSON data: no kept layout
    ("none named, one raw", None, frozenset(["q"])),
]


@pytest.mark.parametrize(("case", "wanted", "binary"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize(("start", "stop"), [(0, 1), (1, 4), (4, 5)])
def test_rows_of_a_batch_encode_as_their_own_tensors(case, wanted, binary, start, stop):
    enc = BinaryEncoder(OUT_SPECS)
    prefix = b'{"model_name":"m","id":"x"'
    want = encode_binary(prefix, OUT_SPECS, [o[start:stop] for o in BATCH], wanted, binary)
    raws = []
    for o in BATCH:
        data = o.contiguous().numpy().tobytes()
        raws.append((data, len(data) // o.shape[0]))
    metas = tuple((o.dtype, tuple(o.shape[1:])) for o in BATCH)
    for _ in range(2):  # made, then kept
        got = enc.encode_rows(prefix, metas, raws, start, stop, wanted, binary)
        assert got == (want if case not in ("one of two raw", "none named, one raw") else None)
        assert enc.encode(prefix, [o[start:stop] for o in BATCH], wanted, binary) == want


def test_kept_layouts_are_bounded():
    enc = BinaryEncoder(OUT_SPECS)
    for rows in range(1, 301):
        tensors = [torch.zeros(rows, 3), torch.zeros(rows, 2, dtype=torch.int64)]
        body, n = enc.encode(b'{"id":"x"', tensors, None, ALL_OUTPUTS)
        assert json.loads(body[:n])["outputs"][0]["shape"] == [rows, 3]
        assert len(enc._layouts) <= BinaryEncoder.KEPT
