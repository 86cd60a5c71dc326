"""``fleetlearn plan``: choose a round's privacy and secure-aggregation parameters before deploying.

One command because the two interact: the dropout and colluding fractions set both SecAgg+'s
(k, t) and t_honest, the number of noisy contributors the DP calibration can count on.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_sdk.commands._arguments import finite_float, integer_at_least
from edge_sdk.modulus import MAX_BITS, MIN_BITS

# Below this fraction of the target, the planner's least noise overshoots: say so, since the
# fleet then gets far less utility than the budget allows.
TARGET_SLACK = 0.5

NAME = "plan"
HELP = "choose DP noise, gamma, clip and SecAgg+ (k, t) for a target (epsilon, delta)"
EXTRA = "host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = finite_float(0.0, exclusive=True)
    parser.add_argument("--epsilon", type=positive, required=True, help="target epsilon over all rounds")
    parser.add_argument("--delta", type=positive, required=True, help="target delta (< 1/population)")
    parser.add_argument("--cohort", type=integer_at_least(1), required=True, help="devices per round")
    parser.add_argument("--population", type=integer_at_least(1), required=True, help="enrolled devices")
    parser.add_argument("--rounds", type=integer_at_least(1), required=True, help="training rounds")
    parser.add_argument("--dim", type=integer_at_least(1), required=True,
                        help="number of model parameters in the update")
    parser.add_argument("--bits", type=int, default=20,
                        help=f"modulus 2^b of the encoded update, {MIN_BITS} to {MAX_BITS} (default 20)")
    parser.add_argument("--dropout", type=finite_float(0.0), default=0.05,
                        help="expected dropout fraction (default 0.05)")
    parser.add_argument("--colluding", type=finite_float(0.0), default=0.05,
                        help="tolerated colluding fraction (default 0.05)")
    parser.add_argument("--clip", type=positive, default=None, help="L2 clip norm C (default 1.0)")
    parser.add_argument("--mechanism", choices=("skellam", "discrete_gaussian"), default="skellam")
    parser.add_argument("--self-selection", action="store_true",
                        help="devices join by a CSPRNG coin (Poisson sampling): claim amplification")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from aggregator.accounting.calibration import calibrate
    from edge_sdk.modulus import check_bits
    from edge_sdk.secagg.parameters import choose_parameters

    check_bits(args.bits)  # the range SecAgg+ and the encoder enforce, before any search
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
        "target": {"epsilon": args.epsilon, "met": cal.epsilon <= args.epsilon},
        "warnings": list(cal.warnings),
    }
    if cal.epsilon > args.epsilon:
        plan["warnings"].append(
            f"target epsilon={args.epsilon:g} is NOT met: the plan achieves epsilon={cal.epsilon:.4g}"
        )
    elif cal.epsilon < TARGET_SLACK * args.epsilon:
        plan["warnings"].append(
            f"target epsilon={args.epsilon:g} is not reached from below: even the least noise the planner "
            f"considers (z={cal.noise_multiplier:g}) gives epsilon={cal.epsilon:.4g}, so the plan is more "
            "private (and noisier) than asked"
        )
    if args.json:
        sys.stdout.write(json.dumps(plan, sort_keys=True, allow_nan=False) + "\n")
        return 0
    p = plan["privacy"]
    sys.stdout.write(
        f"SecAgg+   n={secagg.n}  k={secagg.degree}  t={secagg.threshold}\n"
        f"privacy   {p['mechanism']}  z={p['noise_multiplier']:.4f}  gamma={p['gamma']:.3e}  C={p['clip']:g}  "
        f"b={p['bits']}  t_honest={p['t_honest']}\n"
        f"target    epsilon={args.epsilon:g}: {'met' if plan['target']['met'] else 'NOT MET'}\n"
        f"achieves  epsilon={p['epsilon']:.4f} at delta={p['delta']:g} over {args.rounds} rounds; "
        f"P(wrap)={p['wrap_probability']:.2e}\n"
    )
    for warning in plan["warnings"]:
        sys.stdout.write(f"warning: {warning}\n")
    return 0
