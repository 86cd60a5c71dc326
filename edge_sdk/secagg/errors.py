"""Typed SecAgg+ errors, so callers can tell a tampered peer from a broken configuration.

Every error names what is wrong (which device, which stage, which field), because the round
goes on without the offender and the operator reads these messages in the logs.
"""

from __future__ import annotations

from edge_sdk.errors import ConfigError, FleetlearnError


class SecAggError(FleetlearnError):
    """Base class of every SecAgg+ failure caused by input, peers or configuration."""


class SecAggConfigError(SecAggError, ConfigError):
    """A SecAgg+ parameter (n, k, t, bits, vector length) is out of range."""


class MessageFormatError(SecAggError, ValueError):
    """Bytes on the wire do not parse as a well-formed message (truncated, oversized, trailing data)."""


class SignatureError(SecAggError):
    """A message is unsigned, or its Ed25519 signature does not verify against the enrolled key."""


class ReplayError(SecAggError):
    """A message carries another session id, round or nonce: it was replayed or misrouted."""


class DecryptionError(SecAggError):
    """An encrypted share failed AES-GCM authentication: the ciphertext or its context was altered."""


class ProtocolViolationError(SecAggError):
    """A peer asked for or sent something the protocol forbids (both shares of one device, ...)."""


class ConsistencyError(ProtocolViolationError):
    """The consistency check failed: survivor sets differ or their signatures do not verify."""


class ReconstructionError(SecAggError):
    """Too few Shamir shares to rebuild a secret; the round must abort rather than guess."""
