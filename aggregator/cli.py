"""The ``fleetlearn`` command line.

Adding a subcommand means adding one module to ``edge_sdk.commands`` (device side) or
``aggregator.commands`` (host side). Each module defines::

    NAME: str                       # the subcommand
    HELP: str                       # one line for ``fleetlearn --help``
    def add_arguments(parser): ...  # argparse options
    def run(args) -> int: ...       # the exit code

Command modules must import heavy or host-only packages inside ``run``, so that ``fleetlearn``
starts on a device that has only the four core dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from edge_sdk.errors import FleetlearnError

COMMAND_PACKAGES = ("edge_sdk.commands", "aggregator.commands")

log = logging.getLogger("fleetlearn")


def discover_commands() -> list[ModuleType]:
    """Import every command module of both packages, sorted by subcommand name."""
    modules = []
    for package_name in COMMAND_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            modules.append(importlib.import_module(f"{package_name}.{info.name}"))
    return sorted(modules, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetlearn",
        description="On-device federated learning: compile, train, privatise, mask, aggregate.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in discover_commands():
        command_parser = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except FleetlearnError as exc:
        print(f"fleetlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
