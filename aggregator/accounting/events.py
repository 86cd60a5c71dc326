"""DpEvents for the distributed mechanisms, and the map from a device's ParticipationEvent to them.

How each mechanism enters dp-accounting:
- Skellam sums are a new event kind, ``SkellamDpEvent``, whose RDP curve (Agarwal-Kairouz-Liu'21)
  ``FleetRdpAccountant`` knows.
- Discrete-Gaussian sums are a new event kind too, ``DistributedDiscreteGaussianDpEvent``: its curve
  is the pointwise minimum of Kairouz-Liu-Steinke'21 Thm 1 and Prop 14 (``edge_sdk.privacy.rdp``),
  which no single ``ZCDpEvent`` can express (Prop 14 has an order-independent term).
- Poisson subsampling wraps either in ``PoissonSampledDpEvent``; ``FleetRdpAccountant`` bounds it
  with Zhu-Wang'19 (dp-accounting itself only amplifies Gaussians), capped by the unamplified curve.
- ``off`` rounds are ``NonPrivateDpEvent``.
"""

from __future__ import annotations

import attr
from dp_accounting import dp_event

from edge_sdk.errors import ConfigError
from edge_sdk.privacy.participation import NO_NOISE, ParticipationEvent


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SkellamDpEvent(dp_event.DpEvent):
    """Adding ``Sk(mu, mu)`` noise (variance 2 mu) to a query with the given L1/L2 sensitivities."""

    l1_sensitivity: float
    l2_sensitivity: float
    mu: float


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DistributedDiscreteGaussianDpEvent(dp_event.DpEvent):
    """The sum of ``contributors`` independent ``N_Z(0, local_sigma2)`` vectors of ``dim`` coordinates
    added to a query with the given L1/L2 sensitivities."""

    l1_sensitivity: float
    l2_sensitivity: float
    local_sigma2: float
    contributors: int
    dim: int


def mechanism_dp_event(event: ParticipationEvent, local_only: bool = False) -> dp_event.DpEvent:
    """The DpEvent of one round's release, before any sampling: the honest sum, or one device alone."""
    if event.mechanism == NO_NOISE or not event.is_private:
        return dp_event.NonPrivateDpEvent()
    if event.mechanism == "skellam":
        variance = event.local_variance if local_only else event.central_variance
        return SkellamDpEvent(event.l1_sensitivity, event.l2_sensitivity, variance / 2.0)
    if event.mechanism == "discrete_gaussian":
        contributors = 1 if local_only else event.honest_contributors
        return DistributedDiscreteGaussianDpEvent(
            event.l1_sensitivity, event.l2_sensitivity, event.local_variance, contributors, event.dim
        )
    raise ConfigError(f"no DpEvent for mechanism {event.mechanism!r}")


def round_dp_event(event: ParticipationEvent, local_only: bool = False) -> dp_event.DpEvent:
    """The DpEvent of one participation: Poisson-sampled only if the device self-selected.

    Local-only events never claim amplification: a party that sees one device's update knows that
    the device took part.
    """
    inner = mechanism_dp_event(event, local_only)
    q = event.sampling_probability
    if local_only or q is None or q >= 1.0 or isinstance(inner, dp_event.NonPrivateDpEvent):
        return inner
    return dp_event.PoissonSampledDpEvent(sampling_probability=q, event=inner)
