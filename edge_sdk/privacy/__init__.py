"""Update encoding, integer DP noise and the device privacy ledger.

The public names are importable from here (``from edge_sdk.privacy import DeviceLedger``); each is
loaded from its module on first use. Nothing here needs a host package: accounting over many
rounds lives in ``aggregator.accounting``.
"""

from __future__ import annotations

from edge_sdk.facade import lazy_facade

_EXPORTS = {
    "encoding": ("EncodingParams", "decode_sum", "encode_update"),
    "ledger": ("BudgetDecision", "BudgetExceededError", "DeviceLedger", "LedgerBusyError", "LedgerCorruptError",
               "LedgerError", "LedgerRollbackError", "LedgerSpend"),
    "modes": ("PrivacyMode",),
    "noise": ("DiscreteGaussianNoise", "NoiseMechanism", "SkellamNoise", "fresh_noise_generator",
              "noise_mechanism"),
    "participation": ("ParticipationEvent", "participation_event"),
    "sampling": ("self_select",),
}
__all__, __getattr__, __dir__ = lazy_facade(__name__, globals(), _EXPORTS)
