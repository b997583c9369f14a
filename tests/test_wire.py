import json
import pickle
import random
import struct
from collections import Counter

import pytest
import torch
from torch import nn

from quinkgl_cli import wire
from quinkgl_cli.errors import NetworkError
from quinkgl_cli.tensors import shared_specs
from quinkgl_cli.transport.common import decode_body
from quinkgl_cli.wire import WireError, check_against, decode, decode_full, encode
from tests import wire_fuzz


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def _shared(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_round_trip_every_dtype_and_meta():
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16": torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16),
        "i32": torch.tensor([[-(2**31)], [2**31 - 1]], dtype=torch.int32),
        "i64": torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    meta = {"round": 3, "scheme": "topk", "ratio": 0.1, "blocks": [1, 2], "nested": {"a": None, "b": True}}
    blob = encode(tensors, meta, encoding="qgl-sparse/1")
    out, meta_out, encoding = decode_full(blob)
    assert encoding == "qgl-sparse/1"
    assert meta_out == meta
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_layout_is_little_endian_and_aligned():
    blob = encode({"x": torch.tensor([1.0], dtype=torch.float32), "y": torch.tensor([258], dtype=torch.int16)}, {})
    header, start = wire.read_header(blob)
    assert start % wire.ALIGN == 0
    x, y = header.entries
    assert blob[start + x.offset : start + x.offset + 4] == struct.pack("<f", 1.0)
    assert y.offset % wire.ALIGN == 0
    assert blob[start + y.offset : start + y.offset + 2] == struct.pack("<h", 258)


def test_writable_buffer_is_not_copied_readonly_is():
    blob = bytearray(encode({"w": torch.arange(16, dtype=torch.float32)}, {}))
    out, _ = decode(blob)
    out["w"][0] = 42.0  # a view into the bytearray
    again, _ = decode(blob)
    assert again["w"][0].item() == 42.0
    frozen = bytes(blob)
    out2, _ = decode(frozen)
    out2["w"][1] = -1.0  # must not write into an immutable bytes object
    assert decode(frozen)[0]["w"][1].item() == 1.0


def _mutate_header(blob: bytes, fn) -> bytes:
    header, start = wire.read_header(blob)
    raw = json.loads(header.model_dump_json())
    fn(raw)
    new_header = json.dumps(raw).encode()
    prefix = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, len(new_header))
    head = prefix + new_header
    pad = bytes(wire._align(len(head)) - len(head))
    return head + pad + blob[start:]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda h: h["entries"][0].update(shape=[4, 4]), "do not match shape"),
        (lambda h: h["entries"][0].update(dtype="float64"), "unsupported dtype"),
        (lambda h: h["entries"][0].update(dtype="object"), "unsupported dtype"),
        (lambda h: h["entries"][1].update(offset=0), "expected"),
        (lambda h: h["entries"][0].update(nbytes=10**12, shape=[25 * 10**10]), "exceeds limit"),
        (lambda h: h["entries"][0].update(shape=[-2, -8]), "malformed header: entries.0.shape.0"),
        (lambda h: h["entries"][0].update(shape=[2**63, 0], nbytes=0), "malformed header: entries.0.shape.0"),
        (lambda h: h["entries"][0].update(shape=[0, 2**40, 2**40], nbytes=0), "exceeds limit"),
        (lambda h: h["entries"][0].update(shape=[2**20] * 4 + [0], nbytes=0), "exceeds limit"),
        (lambda h: h["entries"][0].update(shape=[1] * 17), "malformed header: entries.0.shape"),
        (lambda h: h["entries"].append(dict(h["entries"][0])), "duplicate"),
        (lambda h: h.update(extra=1), "malformed header"),
        (lambda h: h["entries"][0].update(name=""), "malformed header"),
    ],
)
def test_header_tampering_is_refused(mutate, reason):
    blob = encode({"a": torch.ones(4), "b": torch.ones(2, 2)}, {})
    with pytest.raises(WireError, match=reason):
        decode(_mutate_header(blob, mutate))


def _with_header_text(blob: bytes, text: str) -> bytes:
    _, start = wire.read_header(blob)
    head = wire.PREFIX.pack(wire.MAGIC, wire.VERSION, len(text.encode())) + text.encode()
    return head + bytes(wire._align(len(head)) - len(head)) + blob[start:]


@pytest.mark.parametrize(
    "token, reason",
    [
        ("NaN", "NaN is not a JSON number"),
        ("Infinity", "Infinity is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e400", "overflows a float"),
        ("-1e400", "overflows a float"),
        ("9" * 5000, "malformed header"),  # past the interpreter's 4300-digit limit
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # past Python's recursion limit
        ("[" * 33 + "]" * 33, "deeper than 32"),
    ],
)
def test_hostile_json_in_meta_is_a_wire_error(token, reason):
    blob = encode({"a": torch.ones(4)}, {"step": 1})
    header, _ = wire.read_header(blob)
    text = header.model_dump_json().replace('"step":1', f'"step":{token}')
    assert token in text
    with pytest.raises(WireError, match=reason):
        decode(_with_header_text(blob, text))
    # The same text as a whole header, not only inside meta.
    with pytest.raises(WireError):
        decode(_with_header_text(blob, token))
    # The numbers a node still needs pass: finite floats, big integers, 32 levels.
    ok = header.model_dump_json().replace('"step":1', '"step":[1e308,-2.5e-300,123456789012345678901234567890]')
    assert decode(_with_header_text(blob, ok))[1]["step"][0] == 1e308


def test_seeded_fuzz_raises_only_wire_errors():
    # A few thousand of benchmarks/fuzz_wire.py's million cases (tests/wire_fuzz.py); before this check existed,
    # these 3000 cases gave RecursionError 246, TypeError 6, RuntimeError 4 and 21 blobs decoded with NaN/inf in meta.
    rng = random.Random(20261203)
    outcomes = Counter(wire_fuzz.run_case(wire_fuzz.make_case(rng)) for _ in range(3000))
    assert set(outcomes) <= wire_fuzz.ESCAPE_FREE, dict(outcomes)
    assert outcomes["refused"] > 2000 and outcomes["accepted"] > 50, dict(outcomes)  # both paths exercised


def test_truncated_extended_and_garbage_blobs_are_refused():
    blob = encode({"a": torch.ones(100)}, {"k": 1})
    for cut in (0, 3, 9, 20, len(blob) - 1):
        with pytest.raises(WireError):
            decode(blob[:cut])
    with pytest.raises(WireError, match="header describes"):
        decode(blob + b"\0")
    with pytest.raises(WireError, match="bad magic"):
        decode(b"XXXX" + blob[4:])
    with pytest.raises(WireError, match="version"):
        decode(blob[:4] + struct.pack("<H", 9) + blob[6:])
    with pytest.raises(WireError, match="header length"):
        decode(wire.PREFIX.pack(wire.MAGIC, wire.VERSION, 2**31) + b"{}")
    with pytest.raises(WireError):
        decode(wire.PREFIX.pack(wire.MAGIC, wire.VERSION, 2) + b"\xff\xfe")


def test_pickle_is_never_accepted():
    evil = pickle.dumps({"a": torch.ones(2)})
    with pytest.raises(WireError):
        decode(evil)


def test_limits_on_entries_and_bytes():
    blob = encode({f"t{i}": torch.ones(1) for i in range(10)}, {})
    with pytest.raises(WireError, match="entries, limit"):
        decode(blob, max_entries=5)
    big = encode({"a": torch.ones(1000)}, {})
    with pytest.raises(WireError, match="limit"):
        decode(big, max_bytes=100)


def test_encode_refuses_unsupported_input():
    with pytest.raises(WireError, match="unsupported dtype"):
        encode({"d": torch.ones(2, dtype=torch.float64)}, {})
    with pytest.raises(WireError, match="cannot encode header"):
        encode({"a": torch.ones(1)}, {"bad": float("nan")})
    with pytest.raises(WireError, match="cannot encode header"):
        encode({"a": torch.ones(1)}, {"bad": object()})


def test_check_against_local_model():
    model = _model()
    specs = shared_specs(model)
    tensors, _ = decode(encode(_shared(model), {}))
    check_against(tensors, specs)

    missing = dict(tensors)
    missing.pop("0.weight")
    with pytest.raises(WireError, match="lacks"):
        check_against(missing, specs)
    extra = dict(tensors, bogus=torch.ones(1))
    with pytest.raises(WireError, match="lacks|model lacks"):
        check_against(extra, specs)
    wrong_shape = dict(tensors, **{"0.weight": torch.ones(4, 9)})
    with pytest.raises(WireError, match="shape"):
        check_against(wrong_shape, specs)
    wrong_dtype = dict(tensors, **{"0.weight": tensors["0.weight"].half()})
    with pytest.raises(WireError, match="dtype"):
        check_against(wrong_dtype, specs)
    check_against(wrong_dtype, specs, check_dtype=False)
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = {k: v.clone() for k, v in tensors.items()}
        poisoned["2.bias"][1] = bad
        with pytest.raises(WireError, match="NaN or Inf"):
            check_against(poisoned, specs)


def test_wire_error_is_a_network_error():
    assert issubclass(WireError, NetworkError)


def test_max_blob_bytes_covers_dense_and_sparse_encodings():
    model = _model()
    specs = shared_specs(model)
    limit = wire.max_blob_bytes(specs)
    dense = encode(_shared(model), {"round": 1, "note": "x" * 1000})
    assert len(dense) <= limit
    sparse = {}
    for name, t in _shared(model).items():
        sparse[name + ".idx"] = torch.arange(t.numel(), dtype=torch.int64)
        sparse[name + ".val"] = t.reshape(-1)
    assert len(encode(sparse, {})) <= limit
    assert limit < 20 * len(dense) + 10 * 64 * 1024


@pytest.mark.parametrize("body", [b'{"step":1e400}', b'{"step":NaN}', b'{"step":-Infinity}', b'{"a":' * 40 + b"1" + b"}" * 40])
def test_control_bodies_and_offer_meta_refuse_what_headers_refuse(body):
    # Offers carry their meta (round, step) as a control body: 1e400 once reached the node's ordering of updates
    # as an OverflowError.
    with pytest.raises(ValueError):
        decode_body(body)
    assert decode_body(b'{"step":1e308,"round":3}') == {"step": 1e308, "round": 3}


def test_declared_encoding_reads_what_the_header_says_or_nothing() -> None:
    from quinkgl_cli.wire import DEFAULT_ENCODING, MAGIC, PREFIX, VERSION, declared_encoding, read_header

    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for encoding in (DEFAULT_ENCODING, "qgl-compressed/1", "x"):
        for meta in ({}, {"round": 3, "k": [1, 2]}, {"encoding": "other"}):
            blob = encode(t, meta, encoding=encoding)
            assert declared_encoding(blob) == read_header(blob)[0].encoding == encoding
            assert declared_encoding(bytearray(blob)) == declared_encoding(memoryview(blob)) == encoding

    def blob_with(header: bytes) -> bytes:
        return PREFIX.pack(MAGIC, VERSION, len(header)) + header

    # Another writer's key order, an escaped name, no name, or not a blob at all: no answer (read the header).
    assert declared_encoding(blob_with(b'{"entries":[],"encoding":"x","meta":{}}')) is None
    assert declared_encoding(blob_with(b'{"encoding":"q\\u0067l","entries":[],"meta":{}}')) is None
    assert declared_encoding(blob_with(b'{"encoding":"","entries":[]}')) is None
    assert declared_encoding(blob_with(b'{"encoding":"x')) is None  # the name runs past the header's end
    assert declared_encoding(b"QGL") is None and declared_encoding(b"junk" * 8) is None
