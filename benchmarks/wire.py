"""Wire-format benchmark: bit-packing and chunking at d = 10^5 and 10^6, b = 16 and 20, against plain
numpy and plain slicing measured in the same run, and the bytes a masked vector puts on the wire.

Run: .venv/bin/python benchmarks/wire.py
Target (issue 10): bytes per device per round <= (b/32 + 0.01) x the float32 model at b = 20, d = 10^5.
Here only the masked vector is counted (envelope and chunk headers included, MQTT framing not): it is
the bulk of a device's upload. It is shown for the vector at length d (the unpadded rotation) and at
the next power of two (the padded one), beside today's codec as uint32 words.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time

import numpy as np

from edge_sdk.secagg import codec
from edge_sdk.secagg import messages as m
from edge_sdk.wire.bitpack import pack_bits, unpack_bits
from edge_sdk.wire.chunking import Reassembler, split
from edge_sdk.wire.envelope import WIRE_VERSION, Envelope, MessageKind, encode_envelope
from edge_sdk.wire.limits import DEFAULT_MAX_PAYLOAD_BYTES, WireLimits
from edge_sdk.wire.secagg_payload import encode_secagg

DIMS = (10**5, 10**6)
BITS = (16, 20)
REPEATS = 9
TARGET_BITS = 20


def median_ms(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def baseline_split(message: bytes, max_payload: int) -> list[bytes]:
    """The floor of chunking: slices of the message and one SHA-256 over it, no headers, no checks."""
    hashlib.sha256(message).digest()
    step = max_payload - 51
    view = memoryview(message)
    return [bytes(view[i:i + step]) for i in range(0, len(message), step)]


def codec_time_rows() -> list[tuple[str, int, int, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    for d in DIMS:
        for b in BITS:
            values = rng.integers(0, 2**b, d, dtype=np.uint64).astype(np.uint32)
            packed = pack_bits(values, b)
            words = values.astype("<u4").tobytes()
            rows.append(("pack_bits", d, b, median_ms(lambda v=values, b=b: pack_bits(v, b)),
                         median_ms(lambda v=values: v.astype("<u4").tobytes())))
            rows.append(("unpack_bits", d, b, median_ms(lambda p=packed, b=b, d=d: unpack_bits(p, b, d)),
                         median_ms(lambda w=words: np.frombuffer(w, dtype="<u4").astype(np.uint32))))
            limits = WireLimits(max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES, max_chunks=1024,
                                max_message_bytes=len(packed) + 1, max_vector_length=d, bits=b)
            chunks = split(packed, DEFAULT_MAX_PAYLOAD_BYTES)

            def reassemble(chunks=chunks, limits=limits):
                r = Reassembler(limits)
                for c in chunks:
                    out = r.add("dev-1", c, now=0.0)
                assert out is not None

            rows.append(("split 128 KiB", d, b, median_ms(lambda p=packed: split(p, DEFAULT_MAX_PAYLOAD_BYTES)),
                         median_ms(lambda p=packed: baseline_split(p, DEFAULT_MAX_PAYLOAD_BYTES))))
            rows.append(("reassemble", d, b, median_ms(reassemble),
                         median_ms(lambda c=chunks: hashlib.sha256(b"".join(x[51:] for x in c)).digest())))
    return rows


def wire_bytes(length: int, bits: int) -> tuple[int, int]:
    """(packed, uint32 words): bytes of every chunk frame of one MaskedInput envelope of ``length`` entries."""
    vector = np.random.default_rng(1).integers(0, 2**bits, length, dtype=np.uint64).astype(np.uint32)
    message = m.MaskedInput("device-0001", b"\x00" * 32, 7, (), b"\x00" * 40, vector, b"\x01" * 64)

    def on_wire(payload: bytes) -> int:
        env = Envelope(WIRE_VERSION, MessageKind.MASKED_INPUT, "fleet", b"\x00" * 32, 7, 3, "device-0001", 1, payload)
        return sum(len(c) for c in split(encode_envelope(env), DEFAULT_MAX_PAYLOAD_BYTES))

    return on_wire(encode_secagg(message, bits)[1]), on_wire(codec.encode(message))


def main() -> None:
    print("wire codec, median ms (one process, same run)")
    print(f"{'operation':<14} {'d':>8} {'b':>3} {'wire':>9} {'baseline':>9} {'ratio':>6}  baseline")
    names = {"pack_bits": "astype('<u4').tobytes()", "unpack_bits": "np.frombuffer('<u4').astype(uint32)",
             "split 128 KiB": "slices + one SHA-256", "reassemble": "join + one SHA-256"}
    for op, d, b, ours, base in codec_time_rows():
        print(f"{op:<14} {d:>8} {b:>3} {ours:>9.2f} {base:>9.2f} {ours / base:>6.2f}  {names[op]}")
    print()
    print("bytes on the wire per masked vector (envelope + 128 KiB chunk frames) against the float32 model")
    print(f"{'d':>8} {'b':>3} {'length':>8} {'packed B':>10} {'x float32':>9} {'u32 words B':>12} {'x float32':>9}  "
          "target")
    for d in DIMS:
        for b in BITS:
            for label, length in (("d", d), ("2^k", 1 << math.ceil(math.log2(d)))):
                packed, words = wire_bytes(length, b)
                model = 4 * d
                target = f"<= {b / 32 + 0.01:.3f}" if b == TARGET_BITS and d == 10**5 else ""
                print(f"{d:>8} {b:>3} {label + '=' + str(length):>8} {packed:>10} {packed / model:>9.3f} "
                      f"{words:>12} {words / model:>9.3f}  {target}")


if __name__ == "__main__":
    main()
