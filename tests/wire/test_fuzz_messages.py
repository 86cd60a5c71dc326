"""Fuzzing every decoder that reads network bytes: only the typed format error, on random and on mutated valid input.

What tests/wire already fuzzes (random bytes into the envelope, a single chunk frame, the array decoders and
the SecAgg+ payloads; shuffled valid chunks) is not repeated. Added here: the round layer's messages (RoundPlan,
Ready, Decline, ModelRelease, DirectoryRelease) and the transport's receipts, random and mutated-valid; SecAgg+
payloads and envelopes mutated from valid ones (random bytes rarely get past the first length field); and the
Reassembler fed arbitrary sequences of valid, mutated and foreign frames from several senders. Valid encodings
round-trip.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.directory import DirectoryRelease
from edge_sdk.protocol.messages import Decline, DeclineReason, ModelRelease, Ready
from edge_sdk.protocol.plan import RoundPlan
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.transport.receipt import Receipt, decode_receipt, sign_receipt
from edge_sdk.wire import MessageKind, WireFormatError, WireLimits
from edge_sdk.wire.chunking import Reassembler, split
from edge_sdk.wire.envelope import WIRE_VERSION, Envelope, decode_envelope, encode_envelope
from edge_sdk.wire.secagg_payload import decode_secagg, encode_secagg


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "vectors" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.slow  # hypothesis: a few seconds per test

golden = _load("wire_make_golden")
plans = _load("round_plan_make_golden")
KEY = IdentityKey(bytes(range(32)))
LIMITS = WireLimits.for_plan(vector_length=1000, bits=golden.BITS, cohort_size=10, model_bytes=4096)

ROUND_SAMPLES = {
    "plan": (RoundPlan.from_bytes, plans.sample_plan().to_bytes()),
    "minimal_plan": (RoundPlan.from_bytes, plans.minimal_plan().to_bytes()),
    "ready": (Ready.from_bytes, Ready("fleet", "dev-1", 3, bytes(32)).sign(KEY).to_bytes()),
    "decline": (Decline.from_bytes, Decline("fleet", "dev-1", 3, bytes(32), DeclineReason.BUDGET, "spent")
                .sign(KEY).to_bytes()),
    "model": (ModelRelease.from_bytes, ModelRelease.of("fleet", 4, bytes(range(64))).sign(KEY).to_bytes()),
    "directory": (DirectoryRelease.from_bytes, DirectoryRelease("fleet", 9, {"dev-1": bytes(32), "dev-2": bytes(
        range(32))}).sign(KEY).to_bytes()),
    "receipt": (decode_receipt, sign_receipt(KEY, Receipt("aggregator", "dev-1", bytes(32), MessageKind.MASKED_INPUT,
                                                          12, bytes(range(32))))),
}


def mutations():
    """A valid encoding with bytes flipped, cut, inserted or overwritten with extreme integers."""
    return st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.binary(min_size=1, max_size=8))


def mutate(data: bytes, how: tuple[int, int, bytes]) -> bytes:
    op, where, extra = how
    if not data:
        return extra
    at = where % (len(data) + 1)
    if op == 0:  # flip bits
        i = where % len(data)
        return data[:i] + bytes([data[i] ^ (extra[0] or 1)]) + data[i + 1:]
    if op == 1:  # truncate
        return data[:at]
    if op == 2:  # insert
        return data[:at] + extra + data[at:]
    return data[:at] + b"\xff" * len(extra) + data[at + len(extra):]  # overwrite with all-ones (huge lengths, counts)


def refuses_typed(decoder, data: bytes) -> None:
    # the typed format errors (WireFormatError, FieldFormatError, ...) all subclass FleetlearnError
    with contextlib.suppress(FleetlearnError):
        decoder(data)


@pytest.mark.parametrize("name", ROUND_SAMPLES)
def test_valid_round_messages_round_trip(name):
    decoder, data = ROUND_SAMPLES[name]
    assert decoder(data).to_bytes() == data if name != "receipt" else decoder(data).signature == data[-64:]


@pytest.mark.parametrize("name", ROUND_SAMPLES)
@given(data=st.binary(max_size=400))
@settings(max_examples=100, deadline=None)
def test_random_bytes_raise_only_typed_errors_from_round_decoders(name, data):
    refuses_typed(ROUND_SAMPLES[name][0], data)


@pytest.mark.parametrize("name", ROUND_SAMPLES)
@given(how=st.lists(mutations(), min_size=1, max_size=3))
@settings(max_examples=150, deadline=None)
def test_mutated_round_messages_raise_only_typed_errors(name, how):
    decoder, data = ROUND_SAMPLES[name]
    for step in how:
        data = mutate(data, step)
    refuses_typed(decoder, data)


SECAGG = [encode_secagg(s, golden.BITS) for s in golden.secagg_samples()]


@given(index=st.integers(0, len(SECAGG) - 1), how=st.lists(mutations(), min_size=1, max_size=3))
@settings(max_examples=300, deadline=None)
def test_mutated_secagg_payloads_raise_only_wire_format_error(index, how):
    kind, data = SECAGG[index]
    for step in how:
        data = mutate(data, step)
    with contextlib.suppress(WireFormatError):
        decode_secagg(kind, data, LIMITS)


@given(index=st.integers(0, len(SECAGG) - 1), how=st.lists(mutations(), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_mutated_envelopes_raise_only_wire_format_error(index, how):
    kind, payload = SECAGG[index]
    data = encode_envelope(Envelope(WIRE_VERSION, kind, "fleet", bytes(32), 5, 1, "dev-1", 77, payload))
    assert decode_envelope(data, LIMITS).payload == payload
    for step in how:
        data = mutate(data, step)
    with contextlib.suppress(WireFormatError):
        decode_envelope(data, LIMITS)


MESSAGES = [encode_envelope(Envelope(WIRE_VERSION, kind, "fleet", bytes(32), 5, 1, "dev-1", i, payload))
            for i, (kind, payload) in enumerate(SECAGG)]
CHUNK = 51 + 97
FRAMES = [split(m, CHUNK) for m in MESSAGES]  # several chunks each
CHUNK_LIMITS = WireLimits.for_plan(vector_length=1000, bits=golden.BITS, cohort_size=10, model_bytes=4096,
                                   max_payload_bytes=CHUNK)


@given(steps=st.lists(st.tuples(st.integers(0, len(FRAMES) - 1), st.integers(0, 50), st.sampled_from("abc"),
                                st.one_of(st.none(), mutations()), st.floats(0, 500)), max_size=60))
@settings(max_examples=150, deadline=None)
def test_the_reassembler_fed_any_frame_sequence_raises_only_wire_format_error(steps):
    assembler = Reassembler(CHUNK_LIMITS)
    now = 0.0
    for message, chunk, sender, how, wait in steps:
        frames = FRAMES[message]
        frame = frames[chunk % len(frames)]
        if how is not None:
            frame = mutate(frame, how)
        now += wait
        try:
            out = assembler.add(sender, frame, now=now)
        except WireFormatError:
            continue
        assert out is None or how is not None or out == MESSAGES[message]  # an unmutated completion is exact
        assembler.expire(now)


@given(st.randoms(use_true_random=False))
@settings(max_examples=100, deadline=None)
def test_interleaved_valid_frames_of_several_senders_all_come_back(rnd):
    assembler = Reassembler(CHUNK_LIMITS)
    pending = [(sender, i, f) for sender in ("a", "b") for i, frames in enumerate(FRAMES[:3]) for f in frames]
    rnd.shuffle(pending)
    done = []
    for sender, _i, frame in pending:
        out = assembler.add(sender, frame, now=0.0)
        if out is not None:
            done.append((sender, out))
    assert sorted(done) == sorted((s, MESSAGES[i]) for s in ("a", "b") for i in range(3))
