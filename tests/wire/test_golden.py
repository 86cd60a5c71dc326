"""Golden bytes: any byte of any frame or message that changes fails here, before it breaks deployed devices.

The pinned file is tests/vectors/wire_golden.json (generator: tests/vectors/wire_make_golden.py).
Besides regenerating everything and comparing, the tests decode the pinned bytes on their own and
read the envelope and chunk layouts by hand at fixed offsets, so a field reorder fails even if
encoder and decoder were changed together.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.secagg import codec
from edge_sdk.wire import MessageKind, WireLimits, decode_envelope
from edge_sdk.wire.arrays import decode_array
from edge_sdk.wire.bitpack import unpack_bits
from edge_sdk.wire.chunking import Reassembler
from edge_sdk.wire.secagg_payload import SECAGG_KINDS, body_sender_of, decode_secagg
from edge_sdk.wire.topics import parse_topic

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
GOLDEN = json.loads((VECTORS / "wire_golden.json").read_text())
LIMITS = WireLimits.for_plan(vector_length=1000, bits=GOLDEN["packed_vector"]["bits"], cohort_size=10,
                             model_bytes=4096)


def _generator():
    spec = importlib.util.spec_from_file_location("wire_make_golden", VECTORS / "wire_make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rebuilt():
    return _generator().build()


def test_the_golden_file_has_a_provenance_header():
    assert "wire_make_golden.py" in GOLDEN["provenance"] and "deterministic" in GOLDEN["provenance"]


@pytest.mark.parametrize("section", sorted(GOLDEN))
def test_regenerating_gives_the_pinned_bytes(rebuilt, section):
    assert rebuilt[section] == GOLDEN[section], f"wire bytes of {section!r} changed: a format change needs a new " \
        "wire version and a deliberate regeneration (tests/vectors/wire_make_golden.py)"


def test_every_secagg_message_type_and_every_kind_is_pinned():
    travelling = {cls.__name__ for cls in SECAGG_KINDS}
    assert set(GOLDEN["secagg"]) == travelling
    pinned = {entry["kind"] for entry in GOLDEN["secagg"].values()} | set(GOLDEN["other_kinds"])
    assert pinned == {kind.name for kind in MessageKind}
    assert GOLDEN["kinds"] == {kind.name: kind.value for kind in MessageKind}


def test_the_envelope_layout_read_by_hand_at_fixed_offsets():
    raw = bytes.fromhex(GOLDEN["envelope"]["bytes"])
    f = GOLDEN["envelope"]["fields"]
    assert raw[:2] == b"FE" and raw[2] == 1 and raw[3] == MessageKind[f["kind"]].value
    n = raw[4]
    assert raw[5:5 + n].decode() == f["fleet"]
    pos = 5 + n
    assert raw[pos:pos + 32].hex() == f["session"]
    round_index, stage = struct.unpack(">QB", raw[pos + 32:pos + 41])
    assert (round_index, stage) == (f["round_index"], f["stage"])
    pos += 41
    n = raw[pos]
    assert raw[pos + 1:pos + 1 + n].decode() == f["sender"]
    pos += 1 + n
    sequence, length = struct.unpack(">QI", raw[pos:pos + 12])
    assert sequence == f["sequence"] and raw[pos + 12:].hex() == f["payload"] and length == len(raw) - pos - 12
    env = decode_envelope(raw, LIMITS)
    assert (env.kind.name, env.fleet, env.sender, env.sequence, env.payload.hex()) == \
        (f["kind"], f["fleet"], f["sender"], f["sequence"], f["payload"])


def test_the_chunk_layout_read_by_hand_and_reassembled():
    c = GOLDEN["chunks"]
    frames = [bytes.fromhex(x) for x in c["frames"]]
    message = bytes.fromhex(c["message"])
    data = c["max_payload"] - 51
    for i, frame in enumerate(frames):
        magic, version, digest, index, count, total, size = struct.unpack(">2sB32sIIII", frame[:51])
        assert (magic, version, index, count, total, size) == (b"FC", 1, i, len(frames), len(message), data)
        assert frame[51:] == message[i * data:(i + 1) * data]
    r = Reassembler(WireLimits(max_payload_bytes=c["max_payload"], max_chunks=8, max_message_bytes=1000,
                               max_vector_length=1, bits=8))
    assert [r.add("dev-1", f, now=0.0) for f in reversed(frames)][-1] == message


def test_the_packed_vectors_unpack_to_their_values():
    p = GOLDEN["packed_vector"]
    values = np.array(p["values"], dtype=np.uint32)
    assert np.array_equal(unpack_bits(bytes.fromhex(p["bytes"]), p["bits"], len(values)), values)
    odd = values & np.uint32(2 ** p["odd_bits"] - 1)
    assert np.array_equal(unpack_bits(bytes.fromhex(p["odd_bytes"]), p["odd_bits"], len(values)), odd)
    stream = sum(int(v) << (i * p["bits"]) for i, v in enumerate(values))
    assert bytes.fromhex(p["bytes"]) == stream.to_bytes(len(bytes.fromhex(p["bytes"])), "little")


def test_the_array_decodes():
    a = GOLDEN["array"]
    arr = decode_array(bytes.fromhex(a["bytes"]), LIMITS)
    assert str(arr.dtype) == a["dtype"] and list(arr.shape) == a["shape"]
    assert np.array_equal(arr, np.arange(6, dtype=np.float32).reshape(2, 3) / 8)


@pytest.mark.parametrize("name", sorted(GOLDEN["secagg"]))
def test_each_pinned_secagg_message_decodes_and_its_signature_verifies(name):
    entry = GOLDEN["secagg"][name]
    env = decode_envelope(bytes.fromhex(entry["envelope"]), LIMITS)
    assert env.kind.name == entry["kind"] and env.payload.hex() == entry["payload"]
    message = decode_secagg(env.kind, env.payload, LIMITS)
    assert type(message).__name__ == name
    assert codec.encode(message).hex() == entry["codec"]  # the packed wire form rebuilds the signed message
    assert codec.encode(codec.decode(bytes.fromhex(entry["codec"]))).hex() == entry["codec"]
    signer = body_sender_of(message) or "aggregator"
    assert env.sender == signer
    codec.verify(message, bytes.fromhex(GOLDEN["identities"][signer]), signer)


def test_the_packed_masked_input_is_smaller_than_the_codec_words():
    entry = GOLDEN["secagg"]["MaskedInput"]
    values = GOLDEN["packed_vector"]["values"]
    saved = len(entry["codec"]) // 2 - (len(entry["payload"]) // 2 - 5)  # 5: the bits and count prefix
    assert saved == 4 * len(values) - -(-len(values) * 20 // 8)


def test_pinned_topics_parse():
    for name, topic in GOLDEN["topics"].items():
        assert str(parse_topic(topic)) == topic, name
