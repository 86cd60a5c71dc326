"""Signed receipts: "I, the receiver, hold this exact message" — what stops a retransmission.

Why signed: a receipt makes its sender stop retransmitting, so a forged one (from anyone who can
publish on the receipt topic, or who sits on the path) would silently lose the message. The
receipt names the acknowledged message by (sender, session, kind, sequence) and by the SHA-256
of its envelope bytes, and is signed with the receiver's Ed25519 identity; the sender checks it
against the key it expects for the party it addressed. Pure: no I/O, no clock.

Layout (big-endian): "FR" magic, u8 version, u8-length receiver id, u8-length sender id,
32-byte session, u8 kind, u64 sequence, 32-byte SHA-256 of the envelope, 64-byte Ed25519
signature over ``SIGNING_DOMAIN`` followed by every preceding byte. Nothing may follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.secagg.errors import SignatureError
from edge_sdk.secagg.keys import SIGNATURE_BYTES, IdentityKey, verify_signature
from edge_sdk.wire.envelope import SESSION_BYTES, MessageKind
from edge_sdk.wire.errors import WireFormatError
from edge_sdk.wire.frame_fields import FrameReader, FrameWriter
from edge_sdk.wire.limits import MAX_ID_BYTES

RECEIPT_MAGIC = b"FR"
RECEIPT_VERSION = 1
DIGEST_BYTES = 32
SIGNING_DOMAIN = b"fleetlearn/transport/v1/receipt\x00"


@dataclass(frozen=True)
class Receipt:
    """``receiver`` acknowledges the message ``sender`` sent as (session, kind, sequence, digest)."""

    receiver: str
    sender: str
    session: bytes
    kind: MessageKind
    sequence: int
    digest: bytes
    signature: bytes = b""

    @property
    def acknowledged(self) -> tuple[str, bytes, MessageKind, int]:
        """The dedup key of the message this receipt is for."""
        return (self.sender, self.session, self.kind, self.sequence)


def _body(r: Receipt) -> bytes:
    w = FrameWriter()
    w.raw(RECEIPT_MAGIC)
    w.uint(RECEIPT_VERSION, 1, "version")
    w.ident(r.receiver, "receiver", MAX_ID_BYTES)
    w.ident(r.sender, "sender", MAX_ID_BYTES)
    w.fixed(r.session, SESSION_BYTES, "session")
    w.uint(int(r.kind), 1, "kind")
    w.uint(r.sequence, 8, "sequence")
    w.fixed(r.digest, DIGEST_BYTES, "digest")
    return w.bytes()


def sign_receipt(identity: IdentityKey, receipt: Receipt) -> bytes:
    """The receipt's bytes, signed by the receiver's identity key."""
    body = _body(receipt)
    return body + identity.sign(SIGNING_DOMAIN + body)


def decode_receipt(data: bytes) -> Receipt:
    """Parse a receipt strictly; the signature is checked separately by ``verify_receipt``."""
    r = FrameReader(data, "receipt")
    r.magic(RECEIPT_MAGIC, "magic", "not a receipt")
    version = r.uint(1, "version")
    if version != RECEIPT_VERSION:
        raise WireFormatError(f"receipt version {version} is not supported (this build speaks {RECEIPT_VERSION})")
    receiver = r.ident("receiver", MAX_ID_BYTES)
    sender = r.ident("sender", MAX_ID_BYTES)
    session = r.fixed(SESSION_BYTES, "session")
    raw_kind = r.uint(1, "kind")
    try:
        kind = MessageKind(raw_kind)
    except ValueError:
        raise WireFormatError(f"receipt kind {raw_kind} is unknown") from None
    sequence = r.uint(8, "sequence")
    digest = r.fixed(DIGEST_BYTES, "digest")
    signature = r.fixed(SIGNATURE_BYTES, "signature")
    r.finish()
    return Receipt(receiver, sender, session, kind, sequence, digest, signature)


def verify_receipt(receipt: Receipt, receiver_public_key: bytes) -> None:
    """Raise ``SignatureError`` unless ``receipt`` is signed by ``receiver_public_key``."""
    if not receipt.signature:
        raise SignatureError(f"receipt from {receipt.receiver!r} is unsigned")
    verify_signature(receiver_public_key, receipt.signature, SIGNING_DOMAIN + _body(receipt),
                     f"receipt from {receipt.receiver!r} for sequence {receipt.sequence}")
