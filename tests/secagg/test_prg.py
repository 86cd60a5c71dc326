"""The mask PRG: pinned vectors, independent re-derivation, determinism and seed sensitivity."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.prg import MaskExpander, MaskPurpose, derive_mask_key, expand_mask, pairwise_sign

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "secagg_prg.json").read_text())["vectors"]


def _key(v: dict) -> bytes:
    return derive_mask_key(bytes.fromhex(v["seed"]), MaskPurpose(v["purpose"].encode()),
                           bytes.fromhex(v["session_id"]), v["round_index"], bytes.fromhex(v["context"]))


def _hkdf_stdlib(seed: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with an all-zero salt, written against hashlib/hmac only."""
    prk = hmac.new(bytes(32), seed, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['purpose']}-{v['round_index']}")
def test_prg_matches_pinned_known_answer_vector(vector):
    key = _key(vector)
    assert key.hex() == vector["aes_key"]
    stream = MaskExpander(vector["length"]).expand(key)
    assert [int(w) for w in stream[:8]] == vector["first_words"]
    assert hashlib.sha256(stream.astype("<u4").tobytes()).hexdigest() == vector["stream_sha256"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['purpose']}-{v['round_index']}")
def test_prg_first_block_is_aes_ecb_of_zero_counter_and_key_is_rfc5869_hkdf(vector):
    context = bytes.fromhex(vector["context"])
    info = (b"fleetlearn/secagg/v1/" + vector["purpose"].encode() + b"|" + bytes.fromhex(vector["session_id"])
            + struct.pack(">Q", vector["round_index"]) + struct.pack(">H", len(context)) + context)
    key = _hkdf_stdlib(bytes.fromhex(vector["seed"]), info, 16)
    assert key.hex() == vector["aes_key"]
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    first_block = encryptor.update(bytes(16)) + encryptor.finalize()
    assert list(struct.unpack("<4I", first_block)) == vector["first_words"][:4]
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    second_block = encryptor.update((1).to_bytes(16, "big")) + encryptor.finalize()
    assert list(struct.unpack("<4I", second_block)) == vector["first_words"][4:8]


def test_same_seed_and_domain_give_the_same_stream():
    seed, session = bytes(range(32)), b"s" * 32
    a = expand_mask(derive_mask_key(seed, MaskPurpose.SELF_MASK, session, 3), 4096, 32)
    b = expand_mask(derive_mask_key(seed, MaskPurpose.SELF_MASK, session, 3), 4096, 32)
    np.testing.assert_array_equal(a, b)


def test_every_bit_of_the_seed_changes_the_output():
    seed, session = bytes(range(32)), b"s" * 32
    base = MaskExpander(8).expand(derive_mask_key(seed, MaskPurpose.SELF_MASK, session, 1)).copy()
    seen = {base.tobytes()}
    for bit in range(256):
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        stream = MaskExpander(8).expand(derive_mask_key(bytes(flipped), MaskPurpose.SELF_MASK, session, 1))
        seen.add(stream.tobytes())
    assert len(seen) == 257


def test_purpose_session_round_and_context_separate_the_domains():
    seed = bytes(32)
    keys = {
        derive_mask_key(seed, MaskPurpose.SELF_MASK, b"a" * 32, 1),
        derive_mask_key(seed, MaskPurpose.PAIRWISE, b"a" * 32, 1),
        derive_mask_key(seed, MaskPurpose.SELF_MASK, b"b" * 32, 1),
        derive_mask_key(seed, MaskPurpose.SELF_MASK, b"a" * 32, 2),
        derive_mask_key(seed, MaskPurpose.SELF_MASK, b"a" * 32, 1, b"ctx"),
    }
    assert len(keys) == 5


@given(bits=st.integers(8, 32), length=st.integers(1, 300))
@settings(max_examples=30, deadline=None)
def test_masks_are_reduced_mod_2_to_the_bits(bits, length):
    mask = expand_mask(bytes(16), length, bits)
    full = MaskExpander(length).expand(bytes(16))
    assert mask.dtype == np.uint32
    assert int(mask.max()) < 2**bits
    np.testing.assert_array_equal(mask, full & np.uint32(2**bits - 1))


def test_expander_reuses_its_buffer_and_adds_and_subtracts_in_place():
    expander = MaskExpander(1000)
    acc = np.arange(1000, dtype=np.uint32)
    expander.add_into(acc, b"k" * 16, +1)
    expander.add_into(acc, b"k" * 16, -1)
    np.testing.assert_array_equal(acc, np.arange(1000, dtype=np.uint32))
    first = expander.expand(b"a" * 16)
    second = expander.expand(b"b" * 16)
    assert np.shares_memory(first, second)


def test_pairwise_signs_cancel_and_refuse_self_pairs():
    assert pairwise_sign(3, 9) == -pairwise_sign(9, 3) == 1
    with pytest.raises(SecAggConfigError, match="itself"):
        pairwise_sign(4, 4)


@pytest.mark.parametrize("bits", [7, 33])
def test_unsupported_bit_widths_are_refused(bits):
    with pytest.raises(SecAggConfigError, match=r"\[8, 32\]"):
        expand_mask(bytes(16), 4, bits)


def test_seed_of_wrong_length_is_refused():
    with pytest.raises(SecAggConfigError, match="32 bytes"):
        derive_mask_key(bytes(16), MaskPurpose.SELF_MASK, b"s", 0)
