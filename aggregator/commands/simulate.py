"""``fleetlearn simulate``: an aggregator and N simulated devices through a real MQTT broker.

Every option is a ``Scenario`` field (``aggregator.simulator.scenario``); options not given keep
the scenario's defaults, and the scenario checks every value (one line naming the option, exit 2).
Without ``--broker`` the embedded amqtt broker is started for the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_sdk.commands._arguments import finite_float, integer_at_least

NAME = "simulate"
HELP = "run an aggregator and N simulated devices through a broker; writes runs/<id>/report.json and plots"
EXTRA = "host,sim"

_FAULT_STAGES = ("TRAIN", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY_CHECK", "UNMASK")  # scenario.FAULT_STAGES


def _stage_probability(text: str) -> tuple[str | None, float]:
    """``[STAGE=]P``: a probability for one stage, or (bare P) for every stage."""
    stage, sep, value = text.rpartition("=")
    stage = stage.strip().upper() if sep else None
    if stage is not None and stage not in _FAULT_STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage!r} in {text!r}; choose from {', '.join(_FAULT_STAGES)}")
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: need [STAGE=]P with P a probability, e.g. 0.1 or "
                                         "SHARE_KEYS=0.1") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: the probability must be in [0, 1]")
    return stage, p


def _shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: need i/N with 0 <= i < N, e.g. 0/2")
    return shard


def _fraction(text: str) -> float:
    value = finite_float(0.0)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: need a fraction in [0, 1]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = finite_float(0.0, exclusive=True)
    seconds = finite_float(0.0)
    fleet = parser.add_argument_group("fleet and data")
    fleet.add_argument("--devices", type=integer_at_least(2), help="simulated devices (default 100)")
    fleet.add_argument("--rounds", type=integer_at_least(1), help="rounds to run (default 20)")
    fleet.add_argument("--bundle", type=Path, metavar="DIR", help="a compiled training bundle (default: --model)")
    fleet.add_argument("--model", help="a model to compile when no --bundle is given (default softmax)")
    fleet.add_argument("--dataset", help="'digits' (default) or an .npz with x and y")
    fleet.add_argument("--partition", choices=("iid", "dirichlet", "shards"), help="how data is split (default "
                                                                                 "dirichlet)")
    fleet.add_argument("--alpha", type=positive, help="Dirichlet concentration (default 0.5; small: skewed)")
    fleet.add_argument("--shards-per-device", type=integer_at_least(1), help="label-sorted shards each (default 2)")
    fleet.add_argument("--test-fraction", type=positive, help="held out for evaluation (default 0.2)")
    fleet.add_argument("--cohort", type=integer_at_least(2), help="devices invited per round (default: all)")
    faults = parser.add_argument_group("faults")
    faults.add_argument("--dropout", type=_stage_probability, action="append", default=[], metavar="[STAGE=]P",
                        help=f"probability a device goes silent at STAGE ({', '.join(_FAULT_STAGES)}); a bare P "
                             "applies to every stage; repeatable")
    faults.add_argument("--crash", type=_stage_probability, action="append", default=[], metavar="[STAGE=]P",
                        help="probability a device's agent is killed at STAGE and re-created from its state "
                             "directory before the next round; repeatable")
    faults.add_argument("--stragglers", type=_fraction, help="fraction of devices slow each round (default 0)")
    faults.add_argument("--straggler-delay", type=seconds, metavar="S", help="seconds a straggler waits per message")
    faults.add_argument("--latency", type=seconds, metavar="S", help="seconds every device waits per message")
    privacy = parser.add_argument_group("privacy and secure aggregation")
    privacy.add_argument("--epsilon", type=positive, help="target ε over the whole run (default 3)")
    privacy.add_argument("--delta", type=positive, help="δ (default 1e-5)")
    privacy.add_argument("--clip", type=positive, help="L2 clip norm (default 1.0)")
    privacy.add_argument("--bits", type=int, help="modulus 2^b of the masked vectors (default 20)")
    privacy.add_argument("--mechanism", choices=("skellam", "discrete_gaussian"), help="DP noise (default skellam)")
    privacy.add_argument("--privacy-mode", choices=("distributed", "local", "off"), help="default distributed")
    privacy.add_argument("--threat-model", choices=("active", "honest-but-curious"), help="default active")
    privacy.add_argument("--colluding", type=_fraction, help="tolerated colluding fraction (default 0.05)")
    privacy.add_argument("--expected-dropout", type=_fraction, help="dropout the plan calibrates for (default 0.1)")
    training = parser.add_argument_group("training")
    training.add_argument("--local-epochs", type=integer_at_least(1), help="local epochs per round (default 10)")
    training.add_argument("--batch-size", type=integer_at_least(1), help="default 4")
    training.add_argument("--lr", type=positive, help="device learning rate (default 0.5)")
    training.add_argument("--strategy", choices=("fedavg", "fedadam"), help="server strategy (default fedavg)")
    training.add_argument("--server-lr", type=positive, help="server learning rate (default 1.0)")
    running = parser.add_argument_group("running")
    running.add_argument("--seed", type=integer_at_least(0), help="the same seed gives the same report (default 0)")
    running.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://...; default: start the "
                                                         "embedded broker")
    running.add_argument("--workers", type=integer_at_least(1), help="device worker processes (default 2)")
    running.add_argument("--shard", type=_shard, metavar="i/N", help="run the i-th of N slices of the fleet (shard "
                                                                     "0 runs the aggregator); needs --broker and "
                                                                     "--run-id")
    running.add_argument("--out", type=Path, default=Path("runs"), metavar="DIR", help="default runs/")
    running.add_argument("--run-id", metavar="ID", help="the run's directory name (default: time and seed)")
    running.add_argument("--plain", action="store_true", help="plain lines even on a terminal")


_FIELDS = ("devices", "rounds", "bundle", "model", "dataset", "partition", "alpha", "shards_per_device",
           "test_fraction", "cohort", "stragglers", "straggler_delay", "latency", "epsilon", "delta", "clip", "bits",
           "mechanism", "privacy_mode", "threat_model", "colluding", "expected_dropout", "local_epochs", "batch_size",
           "lr", "strategy", "server_lr", "seed", "broker", "workers", "shard")


def _per_stage(values: list[tuple[str | None, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage, p in values:
        for s in ([stage] if stage is not None else _FAULT_STAGES):
            out[s] = p
    return out


def scenario_from_args(args: argparse.Namespace):
    """The ``Scenario`` the options describe (unset options keep its defaults)."""
    from aggregator.simulator.scenario import Scenario

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    return Scenario(**given, dropout=_per_stage(args.dropout), crash=_per_stage(args.crash))


def run(args: argparse.Namespace) -> int:
    from aggregator.simulator import simulate
    from aggregator.simulator.progress import make_progress

    scenario = scenario_from_args(args)
    progress = make_progress(sys.stdout, plain=True if args.plain else None, delta=scenario.delta)
    try:
        report = simulate(scenario, args.out, run_id=args.run_id, progress=progress)
    finally:
        progress.close()
    if scenario.shard[0] != 0:
        print(f"shard {scenario.shard[0]}/{scenario.shard[1]}: ran its devices on {report.broker} until shard 0 "
              f"stopped; shard 0 writes the report ({report.timings.get('seconds', 0):.1f} s, peak RSS "
              f"{report.timings.get('peak_rss_mb_total', 0):.0f} MB)")
    return 0
