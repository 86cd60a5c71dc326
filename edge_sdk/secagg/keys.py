"""Key material: Ed25519 identities and the X25519 key pairs a device advertises each round.

Why thin wrappers: keys travel as 32-byte raw encodings inside messages and Shamir shares, so
the rest of the package handles bytes; this module is the only place that converts them to
``cryptography`` key objects and maps its exceptions to our typed errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edge_sdk.secagg.errors import SecAggConfigError, SignatureError

KEY_BYTES = 32
SIGNATURE_BYTES = 64


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@dataclass(frozen=True, repr=False)
class IdentityKey:
    """A device's or the aggregator's long-term Ed25519 signing key (registered at enrolment)."""

    private: bytes
    _key: Ed25519PrivateKey = field(init=False, compare=False)
    _public: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.private) != KEY_BYTES:
            raise SecAggConfigError(f"Ed25519 private key must be 32 bytes, got {len(self.private)}")
        key = Ed25519PrivateKey.from_private_bytes(self.private)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_public", _raw_public(key.public_key()))

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(_raw_private(Ed25519PrivateKey.generate()))

    @property
    def public(self) -> bytes:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:  # never print private key bytes into logs
        return f"IdentityKey(public={self.public.hex()[:16]}...)"


def verify_signature(public_key: bytes, signature: bytes, data: bytes, what: str) -> None:
    """Raise SignatureError naming ``what`` unless ``signature`` is valid for ``data``."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{what}: missing or malformed signature ({len(signature)} bytes, expected 64)")
    if len(public_key) != KEY_BYTES:
        raise SignatureError(f"{what}: enrolled identity key must be 32 bytes, got {len(public_key)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        raise SignatureError(f"{what}: Ed25519 signature does not verify against the enrolled key") from None


@dataclass(frozen=True, repr=False)
class AgreementKey:
    """An ephemeral X25519 key pair; ``private`` is the 32-byte secret that gets Shamir-shared.

    The parsed key object is kept alongside: re-parsing it for every exchange cost the server
    about a third of its X25519 time.
    """

    private: bytes
    _key: X25519PrivateKey = field(init=False, compare=False)
    _public: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.private) != KEY_BYTES:
            raise SecAggConfigError(f"X25519 private key must be 32 bytes, got {len(self.private)}")
        key = X25519PrivateKey.from_private_bytes(self.private)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_public", _raw_public(key.public_key()))

    @classmethod
    def generate(cls) -> AgreementKey:
        return cls(_raw_private(X25519PrivateKey.generate()))

    @property
    def public(self) -> bytes:
        return self._public

    def exchange(self, peer_public: bytes) -> bytes:
        """The 32-byte X25519 shared secret with ``peer_public`` (raises on an all-zero result)."""
        if len(peer_public) != KEY_BYTES:
            raise SecAggConfigError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise SignatureError(f"X25519 agreement with a low-order public key refused: {exc}") from None

    def __repr__(self) -> str:
        return f"AgreementKey(public={self.public.hex()[:16]}...)"
