"""Federated digits end to end (``make demo``): 100 simulated devices, non-IID data, SecAgg+ and distributed DP.

This runs ``aggregator.simulator.simulate``: the production aggregator service and production
device agents (in worker processes) talk through a real MQTT broker (an embedded amqtt broker
unless ``--broker`` names one). Each round every device trains the global model on its own
digits, records the participation in its privacy ledger, clips its update, adds its share of the
Skellam noise, masks it with active-secure SecAgg+ and uploads it; the aggregator unmasks only the
sum, decodes the mean, applies FedAvg and accounts the round with dp-accounting.

The data: scikit-learn's 1797 digits; 20% held out (before partitioning) for the aggregator's
evaluation, the rest split over the devices by label skew, Dirichlet(alpha = 0.5) per class, so a
device holds a few classes in uneven amounts (about 14 digits a device at 100 devices).

The defaults are the configuration chosen by experiment for epsilon = 3 at delta = 1e-5 over all 20
rounds (README, "The demo"): softmax regression (650 parameters), clip C = 1, 10 local epochs of
SGD at lr 0.5 in batches of 4, FedAvg with server lr 1, 20 bits, calibration assuming 10% dropout
and 5% colluders; 3% of the devices go silent in each round before uploading.

    python examples/federated_digits.py [--devices 100] [--rounds 20] [--epsilon 3] [--seed 0]
        [--broker mqtt://host:1883] [--workers 2] [--out runs] [--expect-accuracy 0.85]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.simulator.progress import make_progress  # noqa: E402
from aggregator.simulator.report import PLOT_NAMES  # noqa: E402
from aggregator.simulator.run import simulate  # noqa: E402
from aggregator.simulator.scenario import Scenario  # noqa: E402
from edge_sdk.errors import FleetlearnError  # noqa: E402


def scenario_from(args: argparse.Namespace) -> Scenario:
    return Scenario(
        devices=args.devices, rounds=args.rounds, model=args.model, dataset="digits", partition=args.partition,
        alpha=args.alpha, dropout={"MASKED_INPUT": args.dropout} if args.dropout > 0 else {},
        epsilon=args.epsilon, delta=args.delta, clip=args.clip, bits=args.bits, expected_dropout=args.expected_dropout,
        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, strategy="fedavg",
        server_lr=args.server_lr, seed=args.seed, broker=args.broker, workers=args.workers,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="fleet size; every device joins every round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=3.0, help="target fleet epsilon over all the rounds")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--model", default="softmax", help="a name from aggregator.simulator.models")
    parser.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet", "shards"))
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (small: more skew)")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clip C of one device's update")
    parser.add_argument("--bits", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.03,
                        help="probability a device goes silent each round before its masked update is sent")
    parser.add_argument("--expected-dropout", type=float, default=0.1,
                        help="the dropout fraction the DP calibration and SecAgg+ plan for")
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.5, help="devices' SGD learning rate")
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedAvg's server learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broker", default=None, help="mqtt://host:port of a broker; default: the embedded one")
    parser.add_argument("--workers", type=int, default=2, help="device worker processes")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="directory of the run directories")
    parser.add_argument("--expect-accuracy", type=float, default=None,
                        help="exit with status 1 if the final accuracy is below this")
    args = parser.parse_args()

    try:
        scenario = scenario_from(args)
        print(f"{scenario.devices} devices, {scenario.rounds} rounds, {scenario.partition} data "
              f"(alpha {scenario.alpha:g}), model {scenario.model}; SecAgg+ ({scenario.threat_model}) with "
              f"distributed {scenario.mechanism} DP for epsilon {scenario.epsilon:g} at delta {scenario.delta:g}; "
              f"C={scenario.clip:g}, {scenario.local_epochs} local epochs, lr {scenario.lr:g}, "
              f"batch {scenario.batch_size}, {scenario.strategy} server lr {scenario.server_lr:g}", flush=True)
        with make_progress(sys.stdout, delta=scenario.delta) as progress:
            report = simulate(scenario, args.out, progress=progress)
    except FleetlearnError as exc:
        print(f"federated_digits: error: {exc}", file=sys.stderr)
        return 2
    accuracy = report.final_accuracy
    run_dir = args.out / report.run_id
    print(f"RESULT accuracy={accuracy if accuracy is None else round(accuracy, 4)} "
          f"epsilon={report.final_epsilon:.3f} delta={report.delta:g} broker={report.broker!r}")
    print("plots: " + ", ".join(str(run_dir / name) for name in PLOT_NAMES))
    if args.expect_accuracy is not None and (accuracy is None or accuracy < args.expect_accuracy):
        print(f"federated_digits: final accuracy {accuracy} is below the expected {args.expect_accuracy}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
