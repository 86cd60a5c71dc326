"""Every bound a decoder enforces, derived from the round plan rather than from a global 1 GiB.

Why per plan: a round with d = 10^5 at b = 20 never has a legitimate message above a few hundred
KiB, so a frame that declares 2^31 bytes or 2^20 chunks is refused before anything is allocated.
``WireLimits.for_plan`` takes plain numbers (vector length, bits, cohort size, model size), so the
wire layer does not depend on the round layer's ``RoundPlan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_sdk.errors import ConfigError
from edge_sdk.modulus import check_bits
from edge_sdk.wire.chunking import CHUNK_HEADER_BYTES

DEFAULT_MAX_PAYLOAD_BYTES = 128 * 1024  # AWS IoT Core's cap on one MQTT message
MAX_ID_BYTES = 128  # device ids and fleet names: the same bound as SecAgg+ ids
MESSAGE_SLACK_BYTES = 64 * 1024  # ids, bitmaps, keys and signatures around the bulk of a message
PER_MEMBER_BYTES = 512  # the most one cohort member adds to any roster-sized message (id, advert, signature)
DEFAULT_IN_FLIGHT_PER_SENDER = 4
DEFAULT_PARTIAL_TIMEOUT = 120.0  # seconds a half-received message may wait for its other chunks
DEFAULT_MAX_NDIM = 8
DEFAULT_MAX_ARRAYS = 4096


@dataclass(frozen=True)
class WireLimits:
    """The bounds of one round's traffic; every decoder takes one and names the field it checks.

    - ``max_payload_bytes``: one MQTT payload, i.e. one chunk frame with its header;
    - ``max_chunks``: chunks of one message;
    - ``max_message_bytes``: one whole message (an encoded envelope) after reassembly;
    - ``max_vector_length``: entries of a packed vector, elements of an array;
    - ``bits``: the modulus exponent b of packed vectors (the one range of ``edge_sdk.modulus``);
    - ``max_in_flight_per_sender`` / ``max_sender_bytes``: partial messages and their bytes held per sender;
    - ``max_reassembly_bytes``: partial bytes held for all senders together;
    - ``partial_timeout``: seconds of silence after which a partial message is dropped;
    - ``max_ndim`` / ``max_arrays``: dimensions of one array, arrays in one named set.
    """

    max_payload_bytes: int
    max_chunks: int
    max_message_bytes: int
    max_vector_length: int
    bits: int
    max_in_flight_per_sender: int = DEFAULT_IN_FLIGHT_PER_SENDER
    max_sender_bytes: int = 0  # 0: twice max_message_bytes (one message and a retransmission of it)
    max_reassembly_bytes: int = 0  # 0: 64 senders' worth of max_sender_bytes
    partial_timeout: float = DEFAULT_PARTIAL_TIMEOUT
    max_ndim: int = DEFAULT_MAX_NDIM
    max_arrays: int = DEFAULT_MAX_ARRAYS

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.max_payload_bytes <= CHUNK_HEADER_BYTES:
            raise ConfigError(f"max_payload_bytes must exceed the {CHUNK_HEADER_BYTES}-byte chunk header, "
                              f"got {self.max_payload_bytes}")
        for name in ("max_chunks", "max_message_bytes", "max_vector_length", "max_in_flight_per_sender",
                     "max_ndim", "max_arrays"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_chunks > 1 << 31:
            raise ConfigError(f"max_chunks must be <= 2^31 (a u32 count), got {self.max_chunks}")
        if self.max_message_bytes >= 1 << 32:
            raise ConfigError(f"max_message_bytes must fit a u32 length, got {self.max_message_bytes}")
        if not (self.partial_timeout > 0 and math.isfinite(self.partial_timeout)):
            raise ConfigError(f"partial_timeout must be a finite number of seconds > 0, got {self.partial_timeout}")
        if self.max_sender_bytes == 0:
            object.__setattr__(self, "max_sender_bytes", 2 * self.max_message_bytes)
        if self.max_reassembly_bytes == 0:
            object.__setattr__(self, "max_reassembly_bytes", 64 * self.max_sender_bytes)
        if self.max_sender_bytes < self.max_message_bytes or self.max_reassembly_bytes < self.max_sender_bytes:
            raise ConfigError("need max_message_bytes <= max_sender_bytes <= max_reassembly_bytes, got "
                              f"{self.max_message_bytes}, {self.max_sender_bytes}, {self.max_reassembly_bytes}")

    @property
    def chunk_data_bytes(self) -> int:
        """Message bytes carried by one full chunk."""
        return self.max_payload_bytes - CHUNK_HEADER_BYTES

    @classmethod
    def for_plan(cls, *, vector_length: int, bits: int, cohort_size: int, model_bytes: int,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 partial_timeout: float = DEFAULT_PARTIAL_TIMEOUT) -> WireLimits:
        """The limits of a round: the largest legitimate message is the packed masked vector, the
        encoded model (``model_bytes``: its MODEL payload size) or a roster-sized message of the
        cohort, each with slack for ids, keys and signatures.
        """
        for name, value in (("vector_length", vector_length), ("cohort_size", cohort_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if model_bytes < 0:
            raise ConfigError(f"model_bytes must be >= 0, got {model_bytes}")
        packed = math.ceil(vector_length * check_bits(bits) / 8)
        largest = max(packed, model_bytes, cohort_size * PER_MEMBER_BYTES) + MESSAGE_SLACK_BYTES
        data = max_payload_bytes - CHUNK_HEADER_BYTES
        if data < 1:
            raise ConfigError(f"max_payload_bytes must exceed the {CHUNK_HEADER_BYTES}-byte chunk header, "
                              f"got {max_payload_bytes}")
        sender = 2 * largest
        return cls(max_payload_bytes=max_payload_bytes, max_chunks=math.ceil(largest / data),
                   max_message_bytes=largest, max_vector_length=vector_length, bits=bits,
                   max_sender_bytes=sender, max_reassembly_bytes=(cohort_size + 1) * sender,
                   partial_timeout=partial_timeout)
