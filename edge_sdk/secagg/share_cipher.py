"""Share encryption: X25519 agreement -> HKDF-SHA256 -> AES-256-GCM with full context as AAD.

Why the associated data carries session, round, sender, receiver and stage: a ciphertext lifted
into another session, round, direction or stage fails authentication instead of being accepted.
Every ciphertext carries its own fresh random 96-bit nonce.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_sdk.secagg.errors import DecryptionError, SecAggConfigError

NONCE_BYTES = 12
TAG_BYTES = 16


def share_encryption_key(shared_secret: bytes, session_id: bytes) -> bytes:
    """The AES-256-GCM key for one device pair in one session, from their X25519 secret."""
    info = b"fleetlearn/secagg/v1/share-encryption|" + session_id
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def associated_data(session_id: bytes, round_index: int, sender: str, receiver: str, stage: int) -> bytes:
    """session || round || sender || receiver || stage, length-prefixed so fields cannot slide."""
    s, r = sender.encode(), receiver.encode()
    return (
        struct.pack(">H", len(session_id)) + session_id + struct.pack(">Q", round_index)
        + struct.pack(">H", len(s)) + s + struct.pack(">H", len(r)) + r + struct.pack(">B", stage)
    )


def encrypt_share(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes | None = None) -> tuple[bytes, bytes]:
    """Encrypt ``plaintext``; returns (nonce, ciphertext||tag). The nonce is fresh unless given (tests)."""
    if len(key) != 32:
        raise SecAggConfigError(f"share key must be 32 bytes, got {len(key)}")
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise SecAggConfigError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_share(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, what: str) -> bytes:
    """Decrypt and authenticate, raising DecryptionError naming ``what`` on any tampering."""
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise DecryptionError(f"{what}: malformed nonce or ciphertext")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionError(f"{what}: AES-GCM authentication failed (tampered or wrong context)") from None
