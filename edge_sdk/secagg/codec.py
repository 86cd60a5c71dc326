"""Canonical bytes for SecAgg+ messages, and strict parsing back.

Why hand-rolled struct packing: signatures and associated data need one deterministic encoding
(no pickle, no JSON), and the parser must refuse anything malformed or oversized before it
allocates. Layout: a one-byte type tag, the fields in declaration order (big-endian integers,
u16-length-prefixed ids, u32-count-prefixed sequences, uint32 vectors as little-endian words),
then the signature (u8 length: 0 or 64). The signed payload is a domain string, the tag and the
body without the signature. The versioned wire envelope (``edge_sdk.wire``) carries these bytes
and bit-packs masked vectors.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import numpy as np

from edge_sdk.privacy.ledger_head import LedgerHead
from edge_sdk.secagg import messages as m
from edge_sdk.secagg.errors import MessageFormatError
from edge_sdk.secagg.keys import SIGNATURE_BYTES, IdentityKey, verify_signature
from edge_sdk.secagg.shamir import SHARE_BYTES
from edge_sdk.secagg.share_cipher import NONCE_BYTES

LEDGER_HEAD_BYTES = LedgerHead.SIZE  # u64 sequence number and the SHA-256 of the ledger's last record

SIGNING_DOMAIN = b"fleetlearn/secagg/v1/signed\x00"
MAX_ID_BYTES = 128
MAX_REASON_BYTES = 1024
MAX_ITEMS = 1 << 17  # shares, neighbours, ids
MAX_BITMAP_BYTES = MAX_ITEMS // 8  # member and survivor bitmaps: up to MAX_ITEMS devices
MAX_CIPHERTEXT_BYTES = 1024
MAX_VECTOR_LENGTH = 1 << 28


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack(">B", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack(">Q", v))

    def fixed(self, v: bytes, size: int, name: str) -> None:
        if len(v) != size:
            raise MessageFormatError(f"field {name} must be {size} bytes, got {len(v)}")
        self.parts.append(bytes(v))

    def text(self, v: str, limit: int, name: str) -> None:
        raw = v.encode("utf-8")
        if len(raw) > limit or (limit == MAX_ID_BYTES and not raw):
            raise MessageFormatError(f"field {name} must be 1..{limit} UTF-8 bytes, got {len(raw)}")
        self.parts.append(struct.pack(">H", len(raw)) + raw)

    def blob(self, v: bytes, limit: int, name: str) -> None:
        if len(v) > limit:
            raise MessageFormatError(f"field {name} exceeds {limit} bytes ({len(v)})")
        self.parts.append(struct.pack(">I", len(v)) + bytes(v))

    def count(self, n: int, name: str) -> None:
        if n > MAX_ITEMS:
            raise MessageFormatError(f"field {name} has {n} items, limit is {MAX_ITEMS}")
        self.u32(n)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, name: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise MessageFormatError(f"message truncated while reading {name} ({n} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u32(self, name: str) -> int:
        return struct.unpack(">I", self.take(4, name))[0]

    def u64(self, name: str) -> int:
        return struct.unpack(">Q", self.take(8, name))[0]

    def fixed(self, size: int, name: str) -> bytes:
        return bytes(self.take(size, name))

    def text(self, limit: int, name: str) -> str:
        n = struct.unpack(">H", self.take(2, name))[0]
        if n > limit or (limit == MAX_ID_BYTES and n == 0):
            raise MessageFormatError(f"field {name} must be 1..{limit} bytes, got {n}")
        try:
            return bytes(self.take(n, name)).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageFormatError(f"field {name} is not valid UTF-8") from None

    def blob(self, limit: int, name: str) -> bytes:
        n = self.u32(name)
        if n > limit:
            raise MessageFormatError(f"field {name} declares {n} bytes, limit is {limit}")
        return bytes(self.take(n, name))

    def count(self, name: str, item_bytes: int) -> int:
        n = self.u32(name)
        if n > MAX_ITEMS or n * item_bytes > len(self.data) - self.pos:
            raise MessageFormatError(f"field {name} declares {n} items, more than the message holds")
        return n


# --- field kinds: (write, read) pairs -----------------------------------------------------------

def _id_w(w: _Writer, v: str, name: str) -> None:
    w.text(v, MAX_ID_BYTES, name)


def _id_r(r: _Reader, name: str) -> str:
    return r.text(MAX_ID_BYTES, name)


def _ids_w(w: _Writer, v: tuple[str, ...], name: str) -> None:
    w.count(len(v), name)
    for item in v:
        _id_w(w, item, name)


def _ids_r(r: _Reader, name: str) -> tuple[str, ...]:
    return tuple(_id_r(r, name) for _ in range(r.count(name, 3)))


def _pairs_w(size: int) -> Callable[[_Writer, Any, str], None]:
    def write(w: _Writer, v: tuple[tuple[str, bytes], ...], name: str) -> None:
        w.count(len(v), name)
        for owner, raw in v:
            _id_w(w, owner, name)
            w.fixed(raw, size, name)

    return write


def _pairs_r(size: int) -> Callable[[_Reader, str], Any]:
    def read(r: _Reader, name: str) -> tuple[tuple[str, bytes], ...]:
        return tuple((_id_r(r, name), r.fixed(size, name)) for _ in range(r.count(name, 3 + size)))

    return read


def _shares_w(w: _Writer, v: tuple[m.EncryptedShare, ...], name: str) -> None:
    w.count(len(v), name)
    for s in v:
        _id_w(w, s.sender, name)
        _id_w(w, s.receiver, name)
        w.fixed(s.nonce, NONCE_BYTES, name)
        w.blob(s.ciphertext, MAX_CIPHERTEXT_BYTES, name)


def _shares_r(r: _Reader, name: str) -> tuple[m.EncryptedShare, ...]:
    return tuple(
        m.EncryptedShare(_id_r(r, name), _id_r(r, name), r.fixed(NONCE_BYTES, name), r.blob(MAX_CIPHERTEXT_BYTES, name))
        for _ in range(r.count(name, 6 + NONCE_BYTES + 4))
    )


def _neighbours_w(w: _Writer, v: tuple[m.NeighbourKey, ...], name: str) -> None:
    w.count(len(v), name)
    for key in v:
        _id_w(w, key.device_id, name)
        w.fixed(key.c_public, 32, name)
        w.fixed(key.s_public, 32, name)
        w.fixed(key.self_mask_commitment, 32, name)
        w.fixed(key.signature, SIGNATURE_BYTES, name)


def _neighbours_r(r: _Reader, name: str) -> tuple[m.NeighbourKey, ...]:
    return tuple(
        m.NeighbourKey(_id_r(r, name), r.fixed(32, name), r.fixed(32, name), r.fixed(32, name),
                       r.fixed(SIGNATURE_BYTES, name))
        for _ in range(r.count(name, 3 + 96 + SIGNATURE_BYTES))
    )


def _vector_w(w: _Writer, v: np.ndarray, name: str) -> None:
    if v.dtype != np.uint32 or v.ndim != 1:
        raise MessageFormatError(f"field {name} must be a 1-D uint32 array, got {v.dtype} {v.shape}")
    if v.size > MAX_VECTOR_LENGTH:
        raise MessageFormatError(f"field {name} has {v.size} entries, limit is {MAX_VECTOR_LENGTH}")
    w.u32(v.size)
    w.parts.append(v.astype("<u4", copy=False).tobytes())


def _vector_r(r: _Reader, name: str) -> np.ndarray:
    n = r.u32(name)
    if n > MAX_VECTOR_LENGTH:
        raise MessageFormatError(f"field {name} declares {n} entries, limit is {MAX_VECTOR_LENGTH}")
    return np.frombuffer(r.take(4 * n, name), dtype="<u4").astype(np.uint32)


def _fixed(size: int) -> tuple[Callable[[_Writer, Any, str], None], Callable[[_Reader, str], Any]]:
    return (lambda w, v, name: w.fixed(v, size, name)), (lambda r, name: r.fixed(size, name))


_U8 = (lambda w, v, name: w.u8(v), lambda r, name: r.u8(name))
_U32 = (lambda w, v, name: w.u32(v), lambda r, name: r.u32(name))
_U64 = (lambda w, v, name: w.u64(v), lambda r, name: r.u64(name))
_ID = (_id_w, _id_r)
_IDS = (_ids_w, _ids_r)
_B32 = _fixed(32)
_BITMAP = (lambda w, v, name: w.blob(v, MAX_BITMAP_BYTES, name), lambda r, name: r.blob(MAX_BITMAP_BYTES, name))
_REASON = (lambda w, v, name: w.text(v, MAX_REASON_BYTES, name), lambda r, name: r.text(MAX_REASON_BYTES, name))

_LEDGER_HEAD = _fixed(LEDGER_HEAD_BYTES)


def _signatures_w(w: _Writer, v: tuple[bytes, ...], name: str) -> None:
    w.count(len(v), name)
    for sig in v:
        w.fixed(sig, SIGNATURE_BYTES, name)


def _signatures_r(r: _Reader, name: str) -> tuple[bytes, ...]:
    return tuple(r.fixed(SIGNATURE_BYTES, name) for _ in range(r.count(name, SIGNATURE_BYTES)))


# The roster fields every member receives alike: what the session id hashes.
_ROSTER_SHARED = (("round_index", _U64), ("round_nonce", _B32), ("bits", _U8), ("vector_length", _U32),
                  ("degree", _U32), ("threshold", _U32), ("directory_digest", _B32), ("cohort", _BITMAP),
                  ("members", _BITMAP), ("noise_floor", _U32))

_SCHEMAS: dict[type, tuple[int, tuple[tuple[str, Any], ...]]] = {
    m.RoundStart: (1, (("round_index", _U64), ("round_nonce", _B32), ("bits", _U8), ("vector_length", _U32),
                       ("directory_digest", _B32), ("cohort", _BITMAP), ("noise_floor", _U32))),
    m.AdvertiseKeys: (2, (("device_id", _ID), ("round_index", _U64), ("round_nonce", _B32),
                          ("c_public", _B32), ("s_public", _B32), ("self_mask_commitment", _B32))),
    m.Roster: (3, (("receiver", _ID), *_ROSTER_SHARED, ("neighbours", (_neighbours_w, _neighbours_r)))),
    m.ShareKeys: (4, (("sender", _ID), ("session_id", _B32), ("round_index", _U64),
                      ("shares", (_shares_w, _shares_r)))),
    m.ShareRelay: (5, (("receiver", _ID), ("session_id", _B32), ("round_index", _U64), ("shared", _BITMAP),
                       ("shares", (_shares_w, _shares_r)))),
    m.MaskedInput: (6, (("sender", _ID), ("session_id", _B32), ("round_index", _U64), ("rejected", _IDS),
                        ("ledger_head", _LEDGER_HEAD), ("masked", (_vector_w, _vector_r)))),
    m.SurvivorSet: (7, (("receiver", _ID), ("session_id", _B32), ("round_index", _U64), ("survivors", _BITMAP))),
    m.ConsistencyCheck: (8, (("sender", _ID), ("session_id", _B32), ("round_index", _U64),
                             ("survivors_digest", _B32))),
    m.UnmaskRequest: (9, (("receiver", _ID), ("session_id", _B32), ("round_index", _U64),
                          ("signers", _BITMAP), ("signatures", (_signatures_w, _signatures_r)),
                          ("self_mask_owners", _IDS), ("mask_key_owners", _IDS))),
    m.UnmaskShares: (10, (("sender", _ID), ("session_id", _B32), ("round_index", _U64),
                          ("self_mask_shares", (_pairs_w(SHARE_BYTES), _pairs_r(SHARE_BYTES))),
                          ("mask_key_shares", (_pairs_w(SHARE_BYTES), _pairs_r(SHARE_BYTES))))),
    m.Abort: (11, (("session_id", _B32), ("round_index", _U64), ("reason", _REASON))),
    m.SharePlaintext: (12, (("self_mask_share", _fixed(SHARE_BYTES)), ("mask_key_share", _fixed(SHARE_BYTES)))),
}
_BY_TAG = {tag: (cls, schema) for cls, (tag, schema) in _SCHEMAS.items()}
_SIGNED = frozenset(cls for cls in _SCHEMAS if any(f.name == "signature" for f in fields(cls)))


def _schema(message: Any) -> tuple[int, tuple[tuple[str, Any], ...]]:
    try:
        return _SCHEMAS[type(message)]
    except KeyError:
        raise MessageFormatError(f"{type(message).__name__} is not a SecAgg+ message") from None


def body_bytes(message: Any) -> bytes:
    """The canonical encoding of every field except the signature, tag first."""
    tag, schema = _schema(message)
    w = _Writer()
    w.u8(tag)
    for name, (write, _read) in schema:
        write(w, getattr(message, name), name)
    return w.bytes()


def encode(message: Any) -> bytes:
    """Wire bytes: body, then the signature (if the message type is signed)."""
    body = body_bytes(message)
    if type(message) not in _SIGNED:
        return body
    sig = message.signature
    if len(sig) not in (0, SIGNATURE_BYTES):
        raise MessageFormatError(f"signature must be 0 or {SIGNATURE_BYTES} bytes, got {len(sig)}")
    return body + struct.pack(">B", len(sig)) + sig


def decode(data: bytes) -> Any:
    """Parse wire bytes strictly: unknown tags, truncation, oversize and trailing bytes are errors."""
    if not data:
        raise MessageFormatError("empty message")
    r = _Reader(bytes(data))
    tag = r.u8("type tag")
    if tag not in _BY_TAG:
        raise MessageFormatError(f"unknown message type tag {tag}")
    cls, schema = _BY_TAG[tag]
    values = {name: read(r, name) for name, (_write, read) in schema}
    if cls in _SIGNED:
        n = r.u8("signature length")
        if n not in (0, SIGNATURE_BYTES):
            raise MessageFormatError(f"signature length must be 0 or {SIGNATURE_BYTES}, got {n}")
        values["signature"] = r.fixed(n, "signature")
    if r.pos != len(r.data):
        raise MessageFormatError(f"{len(r.data) - r.pos} trailing bytes after {cls.__name__}")
    return cls(**values)


def signing_payload(message: Any) -> bytes:
    """What an Ed25519 signature covers: a domain string and the canonical body."""
    return SIGNING_DOMAIN + body_bytes(message)


def sign(message: Any, identity: IdentityKey) -> Any:
    """A copy of ``message`` signed by ``identity``."""
    return replace(message, signature=identity.sign(signing_payload(message)))


def verify(message: Any, public_key: bytes, who: str) -> None:
    """Raise SignatureError unless ``message`` is signed by ``public_key`` (``who`` names the signer)."""
    verify_signature(public_key, message.signature, signing_payload(message), f"{type(message).__name__} from {who}")


def session_id_of(roster: m.Roster) -> bytes:
    """SHA-256 over the roster fields every member shares: round, nonce, parameters, directory, members.

    The neighbours' adverts are not in it (each member sees only its own neighbours'); each advert is
    signed by its device over this round's nonce, so the server cannot swap keys without detection.
    """
    w = _Writer()
    for name, (write, _read) in _ROSTER_SHARED:
        write(w, getattr(roster, name), name)
    return hashlib.sha256(b"fleetlearn/secagg/v1/session|" + w.bytes()).digest()
