"""``fleetlearn device budget``: how much privacy this device has spent, from its ledger."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "device"
HELP = "inspect this device's state (privacy budget)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    budget = sub.add_parser("budget", help="show the epsilon spent and left, from the privacy ledger")
    budget.add_argument("--ledger", required=True, metavar="PATH", help="the device's privacy ledger file")
    budget.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from edge_sdk.privacy.ledger import DeviceLedger

    spend = DeviceLedger.snapshot(args.ledger).spent()
    if args.json:
        sys.stdout.write(json.dumps(spend.to_dict(), sort_keys=True) + "\n")
    else:
        sys.stdout.write(
            f"ledger:            {args.ledger}\n"
            f"participations:    {spend.participations}\n"
            f"epsilon spent:     {spend.epsilon:.4f} of {spend.budget_epsilon:.4f} (delta={spend.delta:g})\n"
            f"epsilon left:      {spend.remaining_epsilon:.4f}\n"
            f"local-only eps:    {spend.local_epsilon:.4f} (if the device's own update were seen alone)\n"
        )
    return 0
