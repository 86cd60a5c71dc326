"""Ed25519 signatures over round-layer records, one domain string per record type.

Why a domain per type: a signature made over a Ready must never verify as a plan or a model whose
bytes happen to match, so each type signs ``domain ‖ body`` with its own domain.
"""

from __future__ import annotations

from edge_sdk.secagg.keys import IdentityKey, verify_signature


def sign_body(domain: bytes, body: bytes, identity: IdentityKey) -> bytes:
    """The signature of ``body`` under ``domain``."""
    return identity.sign(domain + body)


def verify_body(domain: bytes, body: bytes, signature: bytes, public_key: bytes, what: str) -> None:
    """Raise ``SignatureError`` naming ``what`` unless ``signature`` covers ``domain ‖ body``."""
    verify_signature(public_key, signature, domain + body, what)

