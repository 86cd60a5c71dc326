"""Shamir sharing, share encryption, identity signatures and the vector layout."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.secagg.errors import DecryptionError, ReconstructionError, SecAggConfigError, SignatureError
from edge_sdk.secagg.keys import AgreementKey, IdentityKey, verify_signature
from edge_sdk.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    LagrangeCache,
    decode_share,
    encode_share,
    lagrange_at_zero,
    reconstruct_secret,
    split_secret,
)
from edge_sdk.secagg.share_cipher import associated_data, decrypt_share, encrypt_share, share_encryption_key
from edge_sdk.secagg.vector_layout import VectorLayout

# --- Shamir -------------------------------------------------------------------------------------


def test_shamir_known_answer_for_a_fixed_polynomial():
    # f(x) = s + 5x + 7x^2 with s = 42: shares at 1, 2, 3 are 54, 80, 120; any 3 rebuild 42.
    shares = {1: 54, 2: 80, 3: 120}
    assert reconstruct_secret(shares, 3) == (42).to_bytes(32, "big")


def test_field_is_the_smallest_prime_above_2_to_the_256():
    assert PRIME == 2**256 + 297
    assert sympy.isprime(PRIME) and sympy.nextprime(2**256) == PRIME
    assert SHARE_BYTES == 33 and (2**256 - 1).bit_length() < PRIME.bit_length() <= 8 * SHARE_BYTES


@given(secret=st.binary(min_size=32, max_size=32), threshold=st.integers(1, 6), extra=st.integers(0, 4))
@settings(max_examples=40, deadline=None)
def test_any_threshold_subset_of_shares_rebuilds_the_secret(secret, threshold, extra):
    xs = list(range(1, threshold + extra + 1))
    shares = split_secret(secret, threshold, xs)
    for subset in itertools.islice(itertools.combinations(xs, threshold), 10):
        assert reconstruct_secret({x: shares[x] for x in subset}, threshold) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_the_secret():
    secret = os.urandom(32)
    shares = split_secret(secret, 4, [1, 2, 3, 4, 5])
    with pytest.raises(ReconstructionError, match="3 shares received, threshold is 4"):
        reconstruct_secret({x: shares[x] for x in (1, 2, 3)}, 4)
    # Interpolating t-1 points as if t-1 were the threshold gives a value unrelated to the secret
    # (or, with probability 297 / 2^256, one that is not 32 bytes at all).
    try:
        wrong = reconstruct_secret({x: shares[x] for x in (1, 2, 3)}, 3)
    except ReconstructionError:
        wrong = None
    assert wrong != secret


def test_batch_inverted_lagrange_coefficients_match_the_textbook_formula():
    xs = (2, 5, 7, 11)
    for i, coefficient in enumerate(lagrange_at_zero(xs)):
        expected = 1
        for j, xj in enumerate(xs):
            if i != j:
                expected = expected * xj * pow(xj - xs[i], -1, PRIME) % PRIME
        assert coefficient == expected


def test_lagrange_cache_computes_each_subset_once():
    cache = LagrangeCache(3)
    for _ in range(5):
        secret = os.urandom(32)
        assert cache.reconstruct(split_secret(secret, 3, [4, 8, 9, 12]), "s") == secret
    assert list(cache._cache) == [(4, 8, 9)]


def test_share_encoding_round_trips_and_rejects_out_of_field_values():
    assert decode_share(encode_share(PRIME - 1)) == PRIME - 1
    with pytest.raises(ReconstructionError, match="not a field element"):
        decode_share(encode_share(PRIME))
    with pytest.raises(ReconstructionError, match="33 bytes"):
        decode_share(b"\x00" * 32)


def test_split_refuses_bad_arguments():
    with pytest.raises(SecAggConfigError, match="32 bytes"):
        split_secret(b"short", 2, [1, 2])
    with pytest.raises(SecAggConfigError, match="threshold"):
        split_secret(bytes(32), 3, [1, 2])
    with pytest.raises(SecAggConfigError, match="distinct"):
        split_secret(bytes(32), 2, [1, 1])


# --- share encryption -----------------------------------------------------------------------------


def _pair_key(session: bytes = b"s" * 32) -> bytes:
    a, b = AgreementKey.generate(), AgreementKey.generate()
    assert a.exchange(b.public) == b.exchange(a.public)
    return share_encryption_key(a.exchange(b.public), session)


def test_share_ciphertext_round_trips_with_a_fresh_nonce_each_time():
    key = _pair_key()
    aad = associated_data(b"s" * 32, 1, "a", "b", 2)
    n1, c1 = encrypt_share(key, b"share", aad)
    n2, c2 = encrypt_share(key, b"share", aad)
    assert n1 != n2 and c1 != c2 and len(n1) == 12
    assert decrypt_share(key, n1, c1, aad, "x") == b"share"


@pytest.mark.parametrize("field", ["session", "round", "sender", "receiver", "stage"])
def test_ciphertext_moved_to_another_context_fails_authentication(field):
    key = _pair_key()
    base = dict(session_id=b"s" * 32, round_index=1, sender="a", receiver="b", stage=2)
    nonce, ct = encrypt_share(key, b"share", associated_data(**base))
    changed = dict(base, **{{"session": "session_id", "round": "round_index"}.get(field, field): {
        "session": b"t" * 32, "round": 2, "sender": "c", "receiver": "c", "stage": 3}[field]})
    with pytest.raises(DecryptionError, match="share from a"):
        decrypt_share(key, nonce, ct, associated_data(**changed), "share from a")


def test_flipping_any_ciphertext_byte_is_detected():
    key = _pair_key()
    aad = associated_data(b"s" * 32, 1, "a", "b", 2)
    nonce, ct = encrypt_share(key, b"0123456789", aad)
    for i in range(len(ct)):
        tampered = bytearray(ct)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptionError, match="authentication failed"):
            decrypt_share(key, nonce, bytes(tampered), aad, "share")


def test_associated_data_fields_cannot_slide_into_each_other():
    assert associated_data(b"s", 1, "ab", "c", 2) != associated_data(b"s", 1, "a", "bc", 2)


# --- identities -----------------------------------------------------------------------------------


def test_signatures_verify_only_under_the_signing_identity():
    alice, mallory = IdentityKey.generate(), IdentityKey.generate()
    signature = alice.sign(b"roster")
    verify_signature(alice.public, signature, b"roster", "alice")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(mallory.public, signature, b"roster", "alice")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(alice.public, signature, b"roster!", "alice")
    with pytest.raises(SignatureError, match="missing or malformed"):
        verify_signature(alice.public, b"", b"roster", "alice")


def test_identity_repr_does_not_leak_the_private_key():
    key = IdentityKey.generate()
    assert key.private.hex() not in repr(key)


def test_x25519_refuses_a_low_order_public_key():
    with pytest.raises(SignatureError, match="low-order"):
        AgreementKey.generate().exchange(bytes(32))


# --- vector layout --------------------------------------------------------------------------------


def test_layout_flattens_and_unflattens_a_dict_of_tensors():
    tensors = {"w": np.arange(6, dtype=np.uint32).reshape(2, 3), "b": np.array([7, 8], dtype=np.uint32)}
    layout = VectorLayout.of(tensors)
    flat = layout.flatten(tensors)
    assert layout.length == 8 and flat.dtype == np.uint32
    np.testing.assert_array_equal(flat, [7, 8, 0, 1, 2, 3, 4, 5])
    back = layout.unflatten(flat)
    assert set(back) == {"w", "b"}
    np.testing.assert_array_equal(back["w"], tensors["w"])


def test_layout_refuses_float_tensors_and_wrong_shapes():
    layout = VectorLayout(("w",), ((2,),))
    with pytest.raises(SecAggConfigError, match="uint32"):
        layout.flatten({"w": np.zeros(2, dtype=np.float32)})
    with pytest.raises(SecAggConfigError, match="shape"):
        layout.flatten({"w": np.zeros(3, dtype=np.uint32)})
    with pytest.raises(SecAggConfigError, match="layout needs"):
        layout.unflatten(np.zeros(3, dtype=np.uint32))


def test_share_key_is_rfc5869_hkdf_of_the_x25519_secret():
    shared, session = bytes(range(32)), b"\x42" * 32
    prk = hmac.new(bytes(32), shared, hashlib.sha256).digest()
    info = b"fleetlearn/secagg/v1/share-encryption|" + session
    expected = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    assert share_encryption_key(shared, session) == expected


def test_x25519_agreement_matches_the_rfc7748_vector():
    alice = AgreementKey(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert alice.public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert alice.exchange(bob_public).hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@given(
    plaintext=st.binary(max_size=200), round_index=st.integers(0, 2**64 - 1), sender=st.text(min_size=1, max_size=20)
)
@settings(max_examples=40, deadline=None)
@pytest.mark.slow  # 1-4 s: 40 X25519 agreements and encryptions
def test_share_encryption_round_trips_for_any_plaintext_and_context(plaintext, round_index, sender):
    key = share_encryption_key(bytes(32), b"s" * 32)
    aad = associated_data(b"s" * 32, round_index, sender, "receiver", 2)
    nonce, ciphertext = encrypt_share(key, plaintext, aad)
    assert len(ciphertext) == len(plaintext) + 16
    assert decrypt_share(key, nonce, ciphertext, aad, "share") == plaintext


def test_agreement_key_refuses_a_private_key_of_the_wrong_length():
    with pytest.raises(SecAggConfigError, match="32 bytes"):
        AgreementKey(b"\x01" * 31)


@given(secret=st.binary(min_size=32, max_size=32), threshold=st.integers(2, 7), extra=st.integers(1, 5),
       corrupt=st.data())
@settings(max_examples=60, deadline=None)
def test_checked_reconstruction_names_exactly_the_corrupted_shares_wherever_they_sit(secret, threshold, extra,
                                                                                     corrupt):
    xs = list(range(1, threshold + extra + 1))
    shares = split_secret(secret, threshold, xs)
    # Up to (N - t) / 2 bad shares of N = shares + the checked secret can be told apart from good ones.
    most = (len(xs) + 1 - threshold) // 2
    bad = set(corrupt.draw(st.lists(st.sampled_from(xs), min_size=1, max_size=max(1, most), unique=True)))
    tampered = {x: (y + 1) % PRIME if x in bad else y for x, y in shares.items()}
    found = LagrangeCache(threshold).reconstruct_checked(tampered, lambda s: s == secret, "test secret")
    assert found.secret == secret
    if len(bad) <= most:
        assert set(found.bad_xs) == bad and not found.ambiguous
    else:
        assert set(found.bad_xs) <= bad  # never an honest share


def test_colluders_whose_errors_cancel_at_zero_cannot_get_honest_shares_blamed():
    # At x = 1, 2, 3 the Lagrange weights at 0 are 3, -3, 1: adding 1 to the shares at 1 and 2 leaves
    # the secret unchanged, so the corrupted subset passes the check; the honest 4 and 5 disagree with it.
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    tampered = {x: (y + 1) % PRIME if x in (1, 2) else y for x, y in shares.items()}
    found = LagrangeCache(3).reconstruct_checked(tampered, lambda s: s == secret, "a secret")
    assert found.secret == secret and found.ambiguous and found.bad_xs == ()


def test_evaluating_the_polynomial_off_the_subset_gives_the_other_shares():
    shares = split_secret(os.urandom(32), 4, list(range(1, 10)))
    cache = LagrangeCache(4)
    assert all(cache.evaluate(shares, (2, 3, 5, 7), x) == shares[x] for x in (1, 4, 6, 8, 9))


def test_checked_reconstruction_gives_up_when_no_subset_rebuilds_the_committed_secret():
    shares = split_secret(os.urandom(32), 3, [1, 2, 3, 4])
    with pytest.raises(ReconstructionError, match="too many bad shares"):
        LagrangeCache(3).reconstruct_checked(shares, lambda s: False, "a secret")
