"""Regenerate tests/vectors/secagg_prg.json (run once; the JSON is the pinned known answer).

The vectors come from the implementation; test_prg.py re-derives the first keystream block
independently (AES-ECB of the zero counter block, HKDF via stdlib HMAC) so they are not circular.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edge_sdk.secagg.prg import MaskExpander, MaskPurpose, derive_mask_key

CASES = [
    ("00" * 32, "self-mask", "11" * 32, 0, ""),
    ("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", "self-mask", "aa" * 32, 7, ""),
    ("ff" * 32, "pairwise-mask", "5e" * 32, 123456789, "0005646576303100056465763032"),
]


def main() -> None:
    vectors = []
    for seed, purpose, session, round_index, context in CASES:
        key = derive_mask_key(bytes.fromhex(seed), MaskPurpose(purpose.encode()), bytes.fromhex(session),
                              round_index, bytes.fromhex(context))
        stream = MaskExpander(1024).expand(key).copy()
        vectors.append({
            "seed": seed, "purpose": purpose, "session_id": session, "round_index": round_index,
            "context": context, "aes_key": key.hex(), "first_words": [int(w) for w in stream[:8]],
            "length": 1024, "stream_sha256": hashlib.sha256(stream.astype("<u4").tobytes()).hexdigest(),
        })
    path = Path(__file__).with_name("secagg_prg.json")
    path.write_text(json.dumps({"prg": "AES-128-CTR, zero initial counter, key = HKDF-SHA256(seed, info)",
                                "vectors": vectors}, indent=2) + "\n")


if __name__ == "__main__":
    main()
