"""Device self-selection by a CSPRNG coin: the only sampling that earns privacy amplification.

Why: amplification by Poisson subsampling assumes each device joins a round independently with
probability q, and that nobody (the server included) can predict or steer the coin. A server-side
choice of cohort gives no such guarantee, so rounds without a device-side coin are accounted
without amplification.
"""

from __future__ import annotations

import secrets

from edge_sdk.errors import ConfigError

_RESOLUTION_BITS = 53


def self_select(sampling_probability: float) -> bool:
    """Flip this device's coin for one round with the OS CSPRNG (``secrets``); True means take part."""
    if not 0.0 < sampling_probability <= 1.0:
        raise ConfigError(f"sampling_probability must be in (0, 1], got {sampling_probability}")
    threshold = round(sampling_probability * (1 << _RESOLUTION_BITS))
    return secrets.randbits(_RESOLUTION_BITS) < threshold
