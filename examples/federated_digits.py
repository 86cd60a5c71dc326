"""Federated learning on scikit-learn's digits with every privacy layer on, in one process.

Each round, a cohort of simulated devices:
1. trains the global model locally with plain onnxruntime (one shared session, one buffer set reused);
2. writes the participation to its privacy ledger (write-ahead), then clips, rotates, rounds and adds
   Skellam noise to its update, mod 2^b;
3. masks it with SecAgg+ (real X25519/Ed25519/AES keys, Shamir shares), some devices dropping out.
The aggregator unmasks only the sum, decodes the mean update, applies it (FedAvg), and reports the
fleet epsilon from dp-accounting. The SecAgg+ machines are the same ones the MQTT service drives;
here the in-memory driver relays their messages.

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
from aggregator.compiler import compile_model  # noqa: E402
from aggregator.secagg import Fleet, ServerConfig, run_session  # noqa: E402
from edge_sdk.privacy import (  # noqa: E402
    DeviceLedger,
    EncodingParams,
    decode_sum,
    encode_update,
    fresh_noise_generator,
    noise_mechanism,
    participation_event,
)
from edge_sdk.secagg import Stage  # noqa: E402
from edge_sdk.training import ModelSession, TrainConfig, TrainingState, evaluate, prepare_dataset, train_local  # noqa: E402


def flatten(params: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([params[n].reshape(-1) for n in names])


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name in names:
        size = like[name].size
        out[name] = vector[offset : offset + size].reshape(like[name].shape).astype(like[name].dtype)
        offset += size
    return out


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
        device_data = [prepare_dataset(session.manifest, x[s], y[s]) for s in shards]
        device_ids = [f"dev-{i:03d}" for i in range(args.devices)]
        fleet = Fleet.enrol(device_ids)
        ledgers = {d: DeviceLedger.open(Path(tmp) / f"{d}.ledger", 1e9, args.delta) for d in device_ids}

        state = TrainingState(session)  # one buffer set, reloaded per device: the train step is stateless
        global_params = state.get_params()
        names = sorted(global_params)
        dim = sum(global_params[n].size for n in names)

        cal = calibrate(args.epsilon, args.delta, cohort_size=args.devices, rounds=args.rounds, dim=dim,
                        bits=args.bits, population=args.devices * 10, dropout_fraction=args.dropout,
                        colluding_fraction=0.05, clip=args.clip)
        print(f"{args.devices} devices, {dim} parameters; calibrated: z={cal.noise_multiplier:.3f} "
              f"gamma={cal.gamma:.2e} C={cal.clip:g} b={cal.bits} t_honest={cal.honest_contributors}")
        for warning in cal.warnings:
            print(f"  calibration warning: {warning}")
        mechanism = noise_mechanism(cal.mechanism)
        accountant = FleetAccountant(args.delta)
        print(f"round 0: test accuracy {evaluate(state, test).accuracy:.3f}")

        for round_index in range(1, args.rounds + 1):
            started = time.perf_counter()
            params = EncodingParams(dim=dim, clip=cal.clip, gamma=cal.gamma, bits=cal.bits,
                                    rotation_seed=secrets.token_bytes(16))
            event = participation_event(params, "distributed", cal.mechanism, cal.noise_multiplier,
                                        cal.honest_contributors)
            base = flatten(global_params, names)
            inputs = {}
            for device, data in zip(device_ids, device_data, strict=True):
                state.set_params(global_params)
                state.reset_optimizer_state()
                train_local(state, data, TrainConfig(epochs=args.local_epochs, batch_size=16, lr=args.lr,
                                                     seed=round_index))
                update = flatten(state.get_params(), names) - base
                if ledgers[device].participate(f"round-{round_index}", event).accepted:
                    inputs[device] = encode_update(update, params, mechanism, event.local_variance,
                                                   fresh_noise_generator())
            dropped = rng.choice(sorted(inputs), size=int(args.dropout * len(inputs)), replace=False)
            stage = (Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)[round_index % 3]
            config = ServerConfig(fleet.server_identity, fleet.enrolled, bits=params.bits,
                                  vector_length=params.padded_dim, dropout_fraction=args.dropout)
            outcome = run_session(fleet, config, inputs, round_index=round_index,
                                  drop_at={stage: set(dropped.tolist())})
            if outcome.aborted:
                print(f"round {round_index}: aborted ({outcome.abort_reason}); the global model is unchanged")
                continue
            contributors = len(outcome.server.contributors)
            mean_update = decode_sum(outcome.result, params, contributors)[:dim]
            global_params = unflatten(base + args.server_lr * mean_update, global_params, names)
            participants = {d: event for d in outcome.server.contributors}
            report = accountant.record_round(f"round-{round_index}", event, participants)
            state.set_params(global_params)
            result = evaluate(state, test)
            # A device that vanishes at UNMASK has already uploaded its masked update, so the server
            # reconstructs its masks and its update still counts; earlier, its update is lost.
            when = "after uploading: still summed" if stage is Stage.UNMASK else "before uploading: not summed"
            print(f"round {round_index:2d}: {contributors} of {len(inputs)} updates summed; {len(dropped)} devices "
                  f"dropped at {stage.name} ({when}); test accuracy {result.accuracy:.3f}, "
                  f"fleet epsilon {report.epsilon:.2f}  ({time.perf_counter() - started:.1f}s)")
        spent = ledgers[device_ids[0]].spent()
        print(f"device {device_ids[0]} ledger: {spent.participations} participations, "
              f"epsilon {spent.epsilon:.2f} (local-only {spent.local_epsilon:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
