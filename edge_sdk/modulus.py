"""The modulus 2^b shared by encoded updates and SecAgg+ masks: one range of b, checked in one place.

The encoder reduces updates mod 2^b, SecAgg+ masks them mod 2^b, and ``fleetlearn plan`` picks b;
all three call ``check_bits`` so a b one of them would refuse is refused by all. Vectors are
``np.uint32``, hence at most 32; fewer than 8 bits leaves no room for a cohort's sum and its noise.
"""

from __future__ import annotations

import operator

from edge_sdk.errors import ConfigError

MIN_BITS = 8
MAX_BITS = 32


def check_bits(bits: int, error: type[ConfigError] = ConfigError) -> int:
    """Return ``bits`` if it is a supported modulus exponent, else raise ``error`` naming the range."""
    try:
        value = operator.index(bits)  # ints and numpy integers; not floats
    except TypeError:
        value = None
    if isinstance(bits, bool) or value is None or not MIN_BITS <= value <= MAX_BITS:
        raise error(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}] (vectors are mod 2^bits on uint32), "
                    f"got {bits!r}")
    return value
