"""Federated learning on scikit-learn's digits with every privacy layer on, in one process.

Each round, a cohort of simulated devices:
1. trains the global model locally with plain onnxruntime (one shared session, one buffer set reused);
2. writes the participation to its privacy ledger (write-ahead), then clips, rotates, rounds and adds
   Skellam noise to its update, mod 2^b;
3. masks it with SecAgg+ (real X25519/Ed25519/AES keys, Shamir shares), some devices dropping out.
The aggregator unmasks only the sum, decodes the mean update, applies it (FedAvg), and reports the
fleet epsilon from dp-accounting. It is the round layer the MQTT service runs: a signed RoundPlan,
HostRound and DeviceRound machines, one pump, every message enveloped and routed by topic; here the
in-memory transport carries the bytes on a virtual clock, and its fault hooks silence the dropouts.

    python examples/federated_digits.py [--devices 40] [--rounds 12] [--epsilon 10] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator import model_zoo  # noqa: E402
from aggregator.accounting.accountant import FleetAccountant  # noqa: E402
from aggregator.accounting.calibration import calibrate  # noqa: E402
from aggregator.accounting.participation_record import ParticipationRecord  # noqa: E402
from aggregator.compiler import compile_model  # noqa: E402
from aggregator.rounds.cohort import CohortPolicy  # noqa: E402
from aggregator.rounds.host_round import HostConfig, draft_plan  # noqa: E402
from aggregator.rounds.memory_fleet import MemoryFleet  # noqa: E402
from aggregator.strategy import make_strategy  # noqa: E402
from edge_sdk.privacy import DeviceLedger, EncodingParams  # noqa: E402
from edge_sdk.privacy.ledger_head import LedgerHead  # noqa: E402
from edge_sdk.protocol.device_effects import DeviceEffectHandlers  # noqa: E402
from edge_sdk.protocol.device_round import DeviceConfig  # noqa: E402
from edge_sdk.protocol.effects import AccountRound, Metric, PersistModel, PersistRound  # noqa: E402
from edge_sdk.protocol.layout import ParameterLayout  # noqa: E402
from edge_sdk.protocol.plan import Sampling, SecAggPolicy, TrainingPlan  # noqa: E402
from edge_sdk.protocol.routing import limits_for  # noqa: E402
from edge_sdk.secagg import IdentityKey, Stage  # noqa: E402
from edge_sdk.training import ModelSession, TrainingState, evaluate, prepare_dataset  # noqa: E402
from edge_sdk.transport.memory import drop_where  # noqa: E402

FLEET = "digits"
# The uplink each SecAgg+ stage sends: a device that drops "at" a stage goes silent from that message on.
UPLINK_OF_STAGE = {Stage.SHARE_KEYS: "share_keys", Stage.MASKED_INPUT: "masked_input", Stage.UNMASK: "unmask_shares"}
UPLINK_ORDER = ["ready", "advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask_shares"]


def silence_from(devices: set[str], kind: str):
    """A transport fault: the devices' uplinks from ``kind`` on never reach the aggregator."""
    later = set(UPLINK_ORDER[UPLINK_ORDER.index(kind):])

    def dropped(topic: str, payload: bytes) -> bool:
        levels = topic.split("/")
        return len(levels) == 6 and levels[3] == "up" and levels[4] in devices and levels[5] in later

    return drop_where(dropped)


class HostAccounting:
    """The aggregator's effect handlers: accounting with dp-accounting, the participation record."""

    def __init__(self, delta: float) -> None:
        self.accountant = FleetAccountant(delta)
        self.record = ParticipationRecord(delta)

    def account(self, effect: AccountRound):
        for device in effect.contributors:
            head = LedgerHead.from_bytes(effect.ledger_heads[device])
            self.record.record(device, effect.round_id, head, effect.event)
        participants = {d: effect.event for d in effect.contributors}
        return self.accountant.record_round(effect.round_id, effect.event, participants)

    def handlers(self) -> dict:
        ignore = lambda effect: None  # noqa: E731 - the example persists nothing
        return {AccountRound: self.account, PersistRound: ignore, PersistModel: ignore, Metric: ignore}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=40, help="cohort size (every device joins every round)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--epsilon", type=float, default=10.0, help="target fleet epsilon over all rounds")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip C of one device's update")
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction of devices that vanish each round")
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(digits.data))
    x, y = (digits.data[order] / 16.0).astype(np.float32), digits.target[order]
    cut = int(0.75 * len(x))
    shards = np.array_split(np.arange(cut), args.devices)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        compile_model(model_zoo.mlp((64, 64, 10), seed=args.seed), bundle, loss="cross_entropy", optimizer="sgd")
        session = ModelSession.open(bundle, threads=1)
        test = prepare_dataset(session.manifest, x[cut:], y[cut:])
        state = TrainingState(session)  # one buffer set, reloaded per device: the train step is stateless
        global_params = state.get_params()
        layout = ParameterLayout.of(global_params)
        dim = layout.dim

        device_ids = [f"dev-{i:03d}" for i in range(args.devices)]
        identities = {d: IdentityKey.generate() for d in device_ids}  # enrolment
        enrolled = {d: k.public for d, k in identities.items()}
        aggregator_key = IdentityKey.generate()
        ledgers = {d: DeviceLedger.open(Path(tmp) / f"{d}.ledger", 1e9, args.delta) for d in device_ids}
        devices = {
            d: (DeviceConfig(FLEET, d, identities[d], aggregator_key.public, enrolled, layout),
                DeviceEffectHandlers(state, prepare_dataset(session.manifest, x[s], y[s]), ledgers[d]).as_mapping())
            for d, s in zip(device_ids, shards, strict=True)
        }
        accounting = HostAccounting(args.delta)
        host = HostConfig(FLEET, aggregator_key, enrolled, layout, make_strategy("fedavg", server_lr=args.server_lr),
                          CohortPolicy(min_size=2, max_size=args.devices, over_selection=0.0))
        fleet = MemoryFleet(host, accounting.handlers(), devices,
                            limits_for(EncodingParams(dim, 1.0, 1.0, args.bits, bytes(16)).padded_dim, args.bits,
                                       args.devices, 4 * dim))

        cal = calibrate(args.epsilon, args.delta, cohort_size=args.devices, rounds=args.rounds, dim=dim,
                        bits=args.bits, population=args.devices * 10, dropout_fraction=args.dropout,
                        colluding_fraction=0.05, clip=args.clip)
        print(f"{args.devices} devices, {dim} parameters; calibrated: z={cal.noise_multiplier:.3f} "
              f"gamma={cal.gamma:.2e} C={cal.clip:g} b={cal.bits} t_honest={cal.honest_contributors}")
        for warning in cal.warnings:
            print(f"  calibration warning: {warning}")
        print(f"round 0: test accuracy {evaluate(state, test).accuracy:.3f}")

        for round_index in range(1, args.rounds + 1):
            started = time.perf_counter()
            encoding = EncodingParams(dim=dim, clip=cal.clip, gamma=cal.gamma, bits=cal.bits,
                                      rotation_seed=secrets.token_bytes(16))
            plan = draft_plan(host, global_params, round_index=round_index, model_version=round_index - 1,
                              training=TrainingPlan(epochs=args.local_epochs, batch_size=16, lr=args.lr,
                                                    seed=round_index),
                              encoding=encoding, mechanism=cal.mechanism, noise_multiplier=cal.noise_multiplier,
                              t_honest=cal.honest_contributors, privacy_mode="distributed",
                              sampling=Sampling.server(device_ids),
                              secagg=SecAggPolicy(dropout_fraction=args.dropout, colluding_fraction=0.05))
            dropped = set(rng.choice(device_ids, size=int(args.dropout * len(device_ids)), replace=False).tolist())
            stage = (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)[round_index % 3]
            outcome = fleet.run_round(plan, global_params, faults=[silence_from(dropped, UPLINK_OF_STAGE[stage])])
            if not outcome.published:
                print(f"round {round_index}: aborted ({outcome.host.abort_reason}); the global model is unchanged")
                continue
            global_params = layout.unflatten(outcome.host.new_params)
            contributors = len(outcome.host.contributors)
            state.set_params(global_params)
            result = evaluate(state, test)
            # A device that vanishes at UNMASK has already uploaded its masked update, so the server
            # reconstructs its masks and its update still counts; earlier, its update is lost.
            when = "after uploading: still summed" if stage is Stage.UNMASK else "before uploading: not summed"
            print(f"round {round_index:2d}: {contributors} of {len(device_ids)} updates summed; {len(dropped)} devices "
                  f"dropped at {stage.name} ({when}); test accuracy {result.accuracy:.3f}, "
                  f"fleet epsilon {outcome.host.report.epsilon:.2f}  ({time.perf_counter() - started:.1f}s)")
        spent = ledgers[device_ids[0]].spent()
        print(f"device {device_ids[0]} ledger: {spent.participations} participations, "
              f"epsilon {spent.epsilon:.2f} (local-only {spent.local_epsilon:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
