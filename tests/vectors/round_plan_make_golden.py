"""Regenerate tests/vectors/round_plan_golden.json: the bytes of fixed round-layer messages.

Run ``.venv/bin/python tests/vectors/round_plan_make_golden.py`` only when a change to the bytes is
intended; tests/protocol/test_plan_golden.py fails on any byte that differs. Ed25519 signatures are
deterministic (RFC 8032), so fixed keys give fixed bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge_sdk.privacy.encoding import EncodingParams  # noqa: E402
from edge_sdk.protocol.messages import Decline, DeclineReason, ModelRelease, Ready  # noqa: E402
from edge_sdk.protocol.plan import RoundPlan, Sampling, SecAggPolicy, StageDeadlines, TrainingPlan  # noqa: E402
from edge_sdk.secagg.keys import IdentityKey  # noqa: E402

OUT = Path(__file__).with_name("round_plan_golden.json")
AGGREGATOR_KEY = IdentityKey(bytes(range(32)))
DEVICE_KEY = IdentityKey(bytes(range(32, 64)))
PARAMETERS = b"".join(i.to_bytes(4, "little") for i in range(8))  # 8 float32 words, any fixed bytes


def sample_plan() -> RoundPlan:
    return RoundPlan(
        fleet="golden", round_index=7, model_version=6, model_digest=hashlib.sha256(PARAMETERS).digest(),
        training=TrainingPlan(epochs=2, batch_size=16, lr=0.125, seed=7),
        encoding=EncodingParams(dim=8, clip=1.0, gamma=0.001953125, bits=20, rotation_seed=bytes(range(16))),
        mechanism="skellam", noise_multiplier=0.75, t_honest=3, privacy_mode="distributed",
        sampling=Sampling.server(["dev-a", "dev-b", "dev-c", "dev-d"]),
        secagg=SecAggPolicy(dropout_fraction=0.1, colluding_fraction=0.05, stage_timeout=30.0, degree=3, threshold=2),
        deadlines=StageDeadlines(ready=10.0, train=120.0), check_back_after=300.0,
    ).sign(AGGREGATOR_KEY)


def minimal_plan() -> RoundPlan:
    """A plan with every optional field absent (defaults): what the oldest writer produces."""
    return RoundPlan(
        fleet="golden", round_index=1, model_version=0, model_digest=hashlib.sha256(PARAMETERS).digest(),
        training=TrainingPlan(epochs=1, batch_size=8, lr=0.5, seed=0),
        encoding=EncodingParams(dim=8, clip=2.0, gamma=0.0078125, bits=16, rotation_seed=bytes(16)),
        mechanism="discrete_gaussian", noise_multiplier=0.0, t_honest=1, privacy_mode="off",
        sampling=Sampling.self_selected(0.25),
    ).sign(AGGREGATOR_KEY)


def vectors() -> dict[str, str]:
    plan = sample_plan()
    ready = Ready("golden", "dev-a", 7, plan.digest).sign(DEVICE_KEY)
    decline = Decline("golden", "dev-b", 7, plan.digest, DeclineReason.BUDGET,
                      "epsilon 9.5 -> 10.2 > 10").sign(DEVICE_KEY)
    model = ModelRelease.of("golden", 6, PARAMETERS).sign(AGGREGATOR_KEY)
    return {"plan": plan.to_bytes().hex(), "plan_minimal": minimal_plan().to_bytes().hex(),
            "ready": ready.to_bytes().hex(), "decline": decline.to_bytes().hex(), "model": model.to_bytes().hex()}


def main() -> None:
    document = {
        "provenance": ("made by tests/vectors/round_plan_make_golden.py from fixed messages signed with the Ed25519 "
                       "keys bytes(range(32)) (aggregator) and bytes(range(32, 64)) (device); regenerate only for an "
                       "intended change of the round-layer bytes, and keep old plans loading"),
        "aggregator_public": AGGREGATOR_KEY.public.hex(),
        "device_public": DEVICE_KEY.public.hex(),
        "vectors": vectors(),
    }
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
