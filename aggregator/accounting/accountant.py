"""Host-side privacy accounting with Google's dp-accounting, composed by counts.

Why counts: an accountant call costs milliseconds, so the fleet keeps a ``Counter`` of distinct
round events and composes ``SelfComposedDpEvent(event, count)`` for each, instead of one call per
round; RDP curves of our own event kinds are cached by event.

- ``FleetRdpAccountant`` extends dp-accounting's ``RdpAccountant`` with ``SkellamDpEvent``,
  ``DistributedDiscreteGaussianDpEvent`` and Poisson subsampling of non-Gaussian events (Zhu-Wang'19
  upper bound, capped at every order by the unamplified curve: claiming amplification never
  reports more than claiming none).
- ``make_accountant(name)`` picks an accountant by name: ``rdp`` (all our events) or ``pld``
  (dp-accounting's PLD accountant: tighter, but Gaussian/Laplace-family events only).
- ``FleetAccountant`` reports, after every round, the fleet-level (epsilon, delta) and each
  device's local-only epsilon.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import PrivacyAccountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import NeighborRel

from aggregator.accounting.events import DistributedDiscreteGaussianDpEvent, SkellamDpEvent, round_dp_event
from edge_sdk.errors import ConfigError
from edge_sdk.privacy.participation import ParticipationEvent
from edge_sdk.privacy.rdp import capped_subsampled_rdp, discrete_gaussian_sum_rdp, epsilon_from_rdp, skellam_rdp

_RDP_ORDERS = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
_CURVE_CACHE: dict[tuple[dp_event.DpEvent, bytes], np.ndarray] = {}
_CURVE_CACHE_LIMIT = 4096


def _cached_curve(event: dp_event.DpEvent, orders: np.ndarray, compute: Callable[[], np.ndarray]) -> np.ndarray:
    key = (event, orders.tobytes())
    curve = _CURVE_CACHE.get(key)
    if curve is None:
        if len(_CURVE_CACHE) >= _CURVE_CACHE_LIMIT:
            _CURVE_CACHE.clear()
        curve = _CURVE_CACHE[key] = compute()
    return curve


def _base_curve(event: dp_event.DpEvent, orders: np.ndarray) -> np.ndarray | None:
    """RDP of a non-sampled event that can sit under Poisson sampling, or None if unsupported."""
    if isinstance(event, SkellamDpEvent):
        return skellam_rdp(orders, event.l1_sensitivity, event.l2_sensitivity, event.mu)
    if isinstance(event, DistributedDiscreteGaussianDpEvent):
        return discrete_gaussian_sum_rdp(
            orders, event.l1_sensitivity, event.l2_sensitivity, event.local_sigma2, event.contributors, event.dim
        )
    if isinstance(event, dp_event.ZCDpEvent):
        return event.xi + event.rho * np.asarray(orders, dtype=np.float64)
    return None


_OWN_EVENTS = (SkellamDpEvent, DistributedDiscreteGaussianDpEvent)


class FleetRdpAccountant(rdp_privacy_accountant.RdpAccountant):
    """dp-accounting's RDP accountant, plus our events and their (and zCDP events') subsampling."""

    def _maybe_compose(self, event: dp_event.DpEvent, count: int, do_compose: bool):
        if isinstance(event, _OWN_EVENTS):
            if do_compose:
                self._rdp += count * _cached_curve(event, self._orders, lambda: _base_curve(event, self._orders))
            return None
        if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(
            event.event, (*_OWN_EVENTS, dp_event.ZCDpEvent)
        ):
            if self._neighboring_relation is not NeighborRel.ADD_OR_REMOVE_ONE:
                return rdp_privacy_accountant.CompositionErrorDetails(
                    invalid_event=event,
                    error_message="Poisson-sampled Skellam, discrete-Gaussian and zCDP events need "
                    "ADD_OR_REMOVE_ONE adjacency",
                )
            if do_compose:
                inner, q = event.event, event.sampling_probability

                def subsampled() -> np.ndarray:
                    return capped_subsampled_rdp(self._orders, q, lambda ls: _base_curve(inner, ls))

                self._rdp += count * _cached_curve(event, self._orders, subsampled)
            return None
        return super()._maybe_compose(event, count, do_compose)


ACCOUNTANTS: dict[str, Callable[[], PrivacyAccountant]] = {
    "rdp": FleetRdpAccountant,
    "pld": pld_privacy_accountant.PLDAccountant,
}


def make_accountant(name: str = "rdp") -> PrivacyAccountant:
    """A fresh accountant by name; ConfigError naming the choices otherwise."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ConfigError(f"accountant {name!r} is unknown; choose one of {sorted(ACCOUNTANTS)}") from None


def composed_by_counts(counts: Mapping[dp_event.DpEvent, int]) -> dp_event.DpEvent:
    """One ComposedDpEvent of ``SelfComposedDpEvent(event, count)`` per distinct event."""
    return dp_event.ComposedDpEvent(
        [dp_event.SelfComposedDpEvent(event, count) for event, count in counts.items() if count > 0]
    )


def epsilon_of(counts: Mapping[dp_event.DpEvent, int], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``counts`` (a fresh accountant every call)."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if not any(counts.values()):
        return 0.0
    acc = make_accountant(accountant)
    acc.compose(composed_by_counts(counts))
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class RoundPrivacyReport:
    """What the aggregator publishes after a round."""

    round_id: str
    rounds: int
    epsilon: float
    delta: float
    local_epsilon: dict[str, float]


@dataclass
class FleetAccountant:
    """The aggregator's running account: events by count for the fleet, and per device (local-only).

    The fleet-level figure assumes the worst case, a device that took part in every round; with
    CSPRNG self-selection each round is Poisson-sampled, which the round events carry.
    """

    delta: float
    accountant: str = "rdp"
    _fleet: Counter[dp_event.DpEvent] = field(default_factory=Counter, init=False)
    _local: dict[str, Counter[dp_event.DpEvent]] = field(default_factory=dict, init=False)
    _rounds: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        make_accountant(self.accountant)

    def record_round(
        self, round_id: str, fleet_event: ParticipationEvent, participants: Mapping[str, ParticipationEvent]
    ) -> RoundPrivacyReport:
        """Add one round (its central event and each participant's own event) and report."""
        self._fleet[round_dp_event(fleet_event)] += 1
        for device, event in participants.items():
            self._local.setdefault(device, Counter())[round_dp_event(event, local_only=True)] += 1
        self._rounds += 1
        return self.report(round_id)

    def report(self, round_id: str = "") -> RoundPrivacyReport:
        return RoundPrivacyReport(
            round_id=round_id,
            rounds=self._rounds,
            epsilon=epsilon_of(self._fleet, self.delta, self.accountant),
            delta=self.delta,
            local_epsilon=self.local_epsilons(self._local.keys()),
        )

    def local_epsilons(self, devices: Iterable[str]) -> dict[str, float]:
        """Each device's local-only epsilon, from cached RDP curves.

        Devices with the same participation history share one computation. The RDP-to-epsilon
        conversion is dp-accounting's formula, vectorised (``edge_sdk.privacy.rdp.epsilon_from_rdp``;
        a test checks the two agree), because the per-order Python loop would dominate a round.
        """
        orders = _RDP_ORDERS
        by_history: dict[frozenset, float] = {}
        out = {}
        for device in devices:
            counts = self._local.get(device, Counter())
            history = frozenset(counts.items())
            if history not in by_history:
                total = np.zeros_like(orders)
                for event, count in counts.items():
                    total = total + count * _cached_curve(event, orders, lambda e=event: _single_curve(e, orders))
                by_history[history] = epsilon_from_rdp(orders, total, self.delta)
            out[device] = by_history[history]
        return out


def _single_curve(event: dp_event.DpEvent, orders: np.ndarray) -> np.ndarray:
    acc = FleetRdpAccountant(orders=orders)
    acc.compose(event)
    return acc.rdp
