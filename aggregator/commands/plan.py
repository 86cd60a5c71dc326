"""``fleetlearn plan``: choose a round's privacy and secure-aggregation parameters before deploying.

One command because the two interact: the dropout and colluding fractions set both SecAgg+'s
(k, t) and t_honest, the number of noisy contributors the DP calibration can count on.
"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "plan"
HELP = "choose DP noise, gamma, clip and SecAgg+ (k, t) for a target (epsilon, delta)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon over all rounds")
    parser.add_argument("--delta", type=float, required=True, help="target delta (< 1/population)")
    parser.add_argument("--cohort", type=int, required=True, help="devices per round")
    parser.add_argument("--population", type=int, required=True, help="enrolled devices")
    parser.add_argument("--rounds", type=int, required=True, help="training rounds")
    parser.add_argument("--dim", type=int, required=True, help="number of model parameters in the update")
    parser.add_argument("--bits", type=int, default=20, help="modulus 2^b of the encoded update (default 20)")
    parser.add_argument("--dropout", type=float, default=0.05, help="expected dropout fraction (default 0.05)")
    parser.add_argument("--colluding", type=float, default=0.05, help="tolerated colluding fraction (default 0.05)")
    parser.add_argument("--clip", type=float, default=None, help="L2 clip norm C (default 1.0)")
    parser.add_argument("--mechanism", choices=("skellam", "discrete_gaussian"), default="skellam")
    parser.add_argument("--self-selection", action="store_true",
                        help="devices join by a CSPRNG coin (Poisson sampling): claim amplification")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from aggregator.accounting.calibration import calibrate
    from edge_sdk.secagg.parameters import choose_parameters

    secagg = choose_parameters(args.cohort, args.dropout, args.colluding)
    cal = calibrate(
        target_epsilon=args.epsilon, delta=args.delta, cohort_size=args.cohort, rounds=args.rounds,
        dim=args.dim, bits=args.bits, population=args.population, dropout_fraction=args.dropout,
        colluding_fraction=args.colluding, clip=args.clip, mechanism=args.mechanism,
        self_selection=args.self_selection,
    )
    plan = {
        "secagg": {"n": secagg.n, "degree_k": secagg.degree, "threshold_t": secagg.threshold},
        "privacy": {
            "mechanism": cal.mechanism, "noise_multiplier": cal.noise_multiplier, "gamma": cal.gamma,
            "clip": cal.clip, "bits": cal.bits, "t_honest": cal.honest_contributors,
            "sampling_probability": cal.sampling_probability, "epsilon": cal.epsilon, "delta": cal.delta,
            "wrap_probability": cal.wrap_probability,
        },
        "warnings": list(cal.warnings),
    }
    if args.json:
        sys.stdout.write(json.dumps(plan, sort_keys=True) + "\n")
        return 0
    p = plan["privacy"]
    sys.stdout.write(
        f"SecAgg+   n={secagg.n}  k={secagg.degree}  t={secagg.threshold}\n"
        f"privacy   {p['mechanism']}  z={p['noise_multiplier']:.4f}  gamma={p['gamma']:.3e}  C={p['clip']:g}  "
        f"b={p['bits']}  t_honest={p['t_honest']}\n"
        f"achieves  epsilon={p['epsilon']:.4f} at delta={p['delta']:g} over {args.rounds} rounds; "
        f"P(wrap)={p['wrap_probability']:.2e}\n"
    )
    for warning in plan["warnings"]:
        sys.stdout.write(f"warning: {warning}\n")
    return 0
