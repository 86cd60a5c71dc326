"""The ``fleetlearn`` command line.

Adding a subcommand means adding one module to ``edge_sdk.commands`` (device side) or
``aggregator.commands`` (host side). Each module defines::

    NAME: str                       # the subcommand, equal to the module's name
    HELP: str                       # one line for ``fleetlearn --help``
    EXTRA: str                      # host modules only: the extra that brings their packages
    def add_arguments(parser): ...  # argparse options
    def run(args) -> int: ...       # the exit code

The dispatcher lives in the device package because a device runs it: ``fleetlearn train`` must
not import ``aggregator`` at all. Host subcommands are found by listing ``aggregator/commands/``
without importing it, and only the subcommand being run (or every one, for ``--help``) is
imported. Command modules import heavy or host-only packages inside ``run``; a host command on a
device install, where those packages are absent, says which extra to install.

Every error a user can cause is one line on stderr and exit code 2; Ctrl-C is exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from edge_sdk import __version__
from edge_sdk.errors import FleetlearnError

DEVICE_COMMANDS = "edge_sdk.commands"
HOST_COMMANDS = "aggregator.commands"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("fleetlearn")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the argument, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _package_modules(package: str) -> dict[str, str]:
    """Subcommand name -> module name for ``package``, found without importing the package itself."""
    top, _, rest = package.partition(".")
    spec = importlib.util.find_spec(top)  # a top-level lookup imports nothing
    if spec is None or not spec.submodule_search_locations:
        return {}
    directories = [str(Path(location, *rest.split("."))) for location in spec.submodule_search_locations]
    return {
        info.name: f"{package}.{info.name}"
        for info in pkgutil.iter_modules(directories)
        if not info.name.startswith("_")
    }


def command_modules() -> dict[str, str]:
    """Every subcommand, device and host, mapped to the module that implements it (nothing imported)."""
    return {**_package_modules(HOST_COMMANDS), **_package_modules(DEVICE_COMMANDS)}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser. With ``only``, the other subcommands are named but their modules are not imported."""
    parser = OneLineParser(
        prog="fleetlearn",
        description="On-device federated learning: compile, train, privatise, mask, aggregate.",
    )
    parser.add_argument("--version", action="version", version=f"fleetlearn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, module_name in sorted(command_modules().items()):
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module: ModuleType = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def _selected_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` if it is a known one, else None (then every module is loaded)."""
    known = command_modules()
    for token in argv:
        if token.startswith("-"):
            continue
        return token if token in known else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_selected_command(argv)).parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = args._module
    prog = f"fleetlearn {args.command}"
    try:
        return int(module.run(args) or 0)
    except FleetlearnError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        extra = getattr(module, "EXTRA", None)
        if extra is None or (exc.name or "").split(".")[0] in ("edge_sdk", "aggregator"):
            raise
        print(
            f"{prog}: error: this is a host command and needs the package {exc.name!r}, which this install lacks; "
            f"install it with: pip install 'fleetlearn[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
