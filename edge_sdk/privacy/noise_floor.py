"""t_honest, the noise floor: how many devices a round can count on to add honest noise.

Why one function for both sides: the SecAgg+ parameter finder and the DP calibration must agree on
how many devices drop out and how many collude. Both round the expected counts *up*
(``ceil(fraction * n)``), the pessimistic side for privacy: rounding down would assume one more
honest contributor than the configured fractions allow (at n = 10 with 5% + 5%, 9 instead of 8).
The ``1e-9`` keeps a product that is an integer up to float rounding (0.05 * 100 = 5.000000000000001)
from being rounded up to the next integer.
"""

from __future__ import annotations

import math

from edge_sdk.errors import ConfigError


def expected_count(fraction: float, n: int) -> int:
    """The number of devices out of ``n`` that a fraction stands for, rounded up."""
    if n < 1:
        raise ConfigError(f"n (the cohort size) must be >= 1, got {n}")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction}")
    return max(0, math.ceil(fraction * n - 1e-9))


def honest_contributors(n: int, dropout_fraction: float, colluding_fraction: float) -> int:
    """t_honest: the cohort minus the dropouts minus the colluders, each rounded up (may be <= 0)."""
    for name, value in (("dropout_fraction", dropout_fraction), ("colluding_fraction", colluding_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    return n - expected_count(dropout_fraction, n) - expected_count(colluding_fraction, n)
