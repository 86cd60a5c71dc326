"""``fleetlearn device``: this device's identity and privacy ledger (``init``, ``budget``) and its agent (``run``).

``init --state-dir DIR`` makes the identity key, the id and the ledger the agent uses and prints
the public key to enrol; ``init --ledger PATH`` alone still makes just a ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_sdk.commands._arguments import finite_float

NAME = "device"
HELP = "this device: create its identity and privacy ledger (init), show the budget spent (budget), run the agent (run)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    init = sub.add_parser(
        "init", help="create the identity key and a privacy ledger with a budget (epsilon, delta); nothing existing "
        "is ever touched"
    )
    init.add_argument("--state-dir", metavar="DIR",
                      help="the agent's state directory: identity key, device id and ledger")
    init.add_argument("--device-id", metavar="ID", help="with --state-dir: the device id (default: the host name)")
    init.add_argument("--ledger", metavar="PATH",
                      help="the ledger file to create (default with --state-dir: DIR/privacy.ledger)")
    init.add_argument("--profile", metavar="NAME|FILE.toml",
                      help="take the budget from this device profile's [privacy] epsilon_budget and delta")
    init.add_argument("--epsilon", type=finite_float(0.0, exclusive=True), help="the budget epsilon (> 0)")
    init.add_argument("--delta", type=float, help="the budget delta, in (0, 1)")
    init.add_argument("--fleet", metavar="ID", help="with --state-dir: the fleet this device joins")
    init.add_argument("--aggregator-key", metavar="HEX|FILE",
                      help="with --state-dir and --fleet: the aggregator's public key (64 hex digits, or a file "
                      "holding them; `fleetlearn aggregator key` prints it), the only key whose plans, models and "
                      "directories this device trusts")
    budget = sub.add_parser("budget", help="show the epsilon spent and left, from the privacy ledger")
    budget.add_argument("--ledger", metavar="PATH", help="the device's privacy ledger file")
    budget.add_argument("--state-dir", metavar="DIR", help="the agent's state directory (its privacy.ledger)")
    budget.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    agent = sub.add_parser("run", help="run the agent: wait for plans, train, privatise, mask and upload, round "
                           "after round (SIGTERM stops it cleanly)")
    agent.add_argument("--profile", required=True, metavar="NAME|FILE.toml",
                       help="the device profile: threads, memory budget, batch-size limit, MQTT keepalive, TLS paths "
                       "and eligibility rules (the options below override its TLS and eligibility)")
    agent.add_argument("--state-dir", required=True, metavar="DIR", help="made by `fleetlearn device init`")
    agent.add_argument("--broker", required=True, metavar="URL[,URL...]",
                       help="mqtt://host:port or mqtts://host:port; several nodes of one broker cluster separated by "
                       "commas, tried in turn when the connection is lost")
    agent.add_argument("--bundle", metavar="DIR", help="the training bundle (default: DIR/bundle)")
    agent.add_argument("--data", metavar="FILE.npz", help="the local training data, x and y (default: DIR/data.npz)")
    agent.add_argument("--tls-ca", metavar="FILE", help="the CA that signed the broker's certificate "
                       "(default: the profile's [tls] ca)")
    agent.add_argument("--tls-cert", metavar="FILE", help="this device's client certificate (mTLS; default: the "
                       "profile's [tls] cert)")
    agent.add_argument("--tls-key", metavar="FILE", help="its private key (default: the profile's [tls] key)")
    agent.add_argument("--username", metavar="NAME", help="broker user name (default: none)")
    agent.add_argument("--password-file", metavar="FILE", help="a file holding the broker password")
    agent.add_argument("--rounds", type=int, metavar="N", help="stop after N rounds ended here (default: never)")
    for name, what in (("--min-battery", "minimum battery percent on battery"),
                       ("--max-cpu-celsius", "maximum CPU temperature"),
                       ("--max-load-per-cpu", "maximum 1-minute load per CPU (idleness)")):
        agent.add_argument(name, type=_number_or_off, metavar="X|off",
                           help=f"eligibility: {what} ('off': no rule; default: the profile's [eligibility])")
    agent.add_argument("--require-charging", action="store_true",
                       help="eligibility: only on mains or charging (default: the profile's require_charging)")


def _number_or_off(text: str) -> float | str:
    if text == "off":
        return text
    return finite_float(0.0)(text)


def _ledger_file(path_text: str, *, must_exist: bool) -> Path:
    from edge_sdk.privacy import LedgerError

    path = Path(path_text)
    if path.is_dir():
        raise LedgerError(f"--ledger {path_text} is a directory; give the ledger file, e.g. {path / 'privacy.ledger'}")
    if must_exist and not path.exists():
        raise LedgerError(f"--ledger {path_text}: no privacy ledger there; create one with `fleetlearn device init`")
    if not must_exist and path.exists():
        raise LedgerError(
            f"--ledger {path_text} already exists and is left as it is; `fleetlearn device budget` shows it"
        )
    if not path.parent.is_dir():
        raise LedgerError(f"--ledger {path_text}: directory {path.parent} does not exist; create it first")
    return path


def _init(args: argparse.Namespace) -> int:
    from edge_sdk.config import load_profile
    from edge_sdk.errors import ConfigError
    from edge_sdk.privacy import DeviceLedger

    if args.profile is not None:
        if args.epsilon is not None or args.delta is not None:
            raise ConfigError("give --profile or --epsilon with --delta, not both")
        profile = load_profile(args.profile)
        epsilon, delta = profile.epsilon_budget, profile.delta
    elif args.epsilon is None or args.delta is None:
        raise ConfigError("give the budget as --epsilon E --delta D, or name a --profile")
    else:
        epsilon, delta = args.epsilon, args.delta
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    provisioning = None
    if args.state_dir is not None:
        from edge_sdk.device.state_dir import (
            Provisioning,
            StateDirError,
            check_device_id,
            create_identity,
            default_device_id,
            parse_aggregator_key,
        )

        device_id = check_device_id(args.device_id or default_device_id())
        if (args.fleet is None) != (args.aggregator_key is None):
            raise StateDirError("give --fleet and --aggregator-key together (the agent needs both), or neither")
        if args.fleet is not None:
            provisioning = Provisioning(check_device_id(args.fleet), parse_aggregator_key(args.aggregator_key))
    elif args.fleet is not None or args.aggregator_key is not None:
        from edge_sdk.device.state_dir import StateDirError

        raise StateDirError("--fleet and --aggregator-key go with --state-dir")
    state_dir = _state_dir(args)
    path = _ledger_file(args.ledger, must_exist=False)
    if state_dir is not None:
        identity = create_identity(state_dir, device_id)  # refuses an initialised directory, before the ledger
        if provisioning is not None:
            from edge_sdk.device.state_dir import write_provisioning

            write_provisioning(state_dir, provisioning)
    try:
        with DeviceLedger.open(path, epsilon, delta) as ledger:
            spend = ledger.spent()
    except OSError as exc:
        raise ConfigError(f"--ledger {args.ledger}: cannot create the ledger: {exc}") from exc
    sys.stdout.write(
        f"created privacy ledger {path}: budget epsilon={spend.budget_epsilon:g} delta={spend.delta:g}\n"
    )
    if state_dir is not None:
        sys.stdout.write(
            f"created identity of device {device_id} in {state_dir}\n"
            f"public key: {identity.public.hex()}\n"
            f"enrol it on the aggregator with: fleetlearn aggregator enrol --store STORE --device {device_id} "
            f"--public-key {identity.public.hex()}\n"
        )
        if provisioning is not None:
            sys.stdout.write(f"trusts aggregator key {provisioning.aggregator_public.hex()} of fleet "
                             f"{provisioning.fleet}\n")
    return 0


def _state_dir(args: argparse.Namespace) -> Path | None:
    """The state directory of ``init`` (created, 0700) or ``budget``; fills in ``args.ledger`` from it."""
    from edge_sdk.device.state_dir import LEDGER_FILE, StateDirError

    creating = args.device_command == "init"
    if args.state_dir is None:
        if args.ledger is None:
            raise StateDirError("give --state-dir DIR (the agent's identity and ledger) or --ledger PATH")
        if creating and args.device_id is not None:
            raise StateDirError("--device-id goes with --state-dir")
        return None
    directory = Path(args.state_dir)
    if creating and not directory.exists():
        if not directory.parent.is_dir():
            raise StateDirError(f"--state-dir {args.state_dir}: directory {directory.parent} does not exist")
        directory.mkdir(mode=0o700)
    if not directory.is_dir():
        raise StateDirError(f"--state-dir {args.state_dir} is not a directory")
    if args.ledger is None:
        args.ledger = str(directory / LEDGER_FILE)
    return directory


def _budget(args: argparse.Namespace) -> int:
    from edge_sdk.privacy import DeviceLedger, LedgerError

    _state_dir(args)
    path = _ledger_file(args.ledger, must_exist=True)
    try:
        spend = DeviceLedger.snapshot(path).spent()
    except OSError as exc:
        raise LedgerError(f"--ledger {args.ledger}: cannot read the ledger: {exc}") from exc
    if args.json:
        sys.stdout.write(json.dumps(spend.to_dict(), sort_keys=True, allow_nan=False) + "\n")
    else:
        sys.stdout.write(
            f"ledger:            {args.ledger}\n"
            f"participations:    {spend.participations}\n"
            f"epsilon spent:     {spend.epsilon:.4f} of {spend.budget_epsilon:.4f} (delta={spend.delta:g})\n"
            f"epsilon left:      {spend.remaining_epsilon:.4f}\n"
            f"local-only eps:    {spend.local_epsilon:.4f} (if the device's own update were seen alone)\n"
        )
    return 0


def agent_settings(args: argparse.Namespace):
    """``device run``'s options over its profile: TLS and eligibility options win, the rest is the profile's."""
    from dataclasses import replace

    from edge_sdk.config import load_profile
    from edge_sdk.device.agent import AgentSettings

    profile = load_profile(args.profile)
    state_dir = Path(args.state_dir)
    bundle = Path(args.bundle) if args.bundle else state_dir / "bundle"
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    options = {"min_battery_percent": args.min_battery, "max_cpu_celsius": args.max_cpu_celsius,
               "max_load_per_cpu": args.max_load_per_cpu}
    policy = replace(profile.eligibility.policy(),
                     **{k: None if v == "off" else v for k, v in options.items() if v is not None})
    if args.require_charging:
        policy = replace(policy, require_charging=True)
    ca, cert, key = _tls_files(args, profile)
    return AgentSettings(state_dir=state_dir, broker_url=args.broker, bundle=bundle,
                         data=Path(args.data) if args.data else state_dir / "data.npz",
                         threads=profile.threads, policy=policy, username=args.username, password=password,
                         ca_file=ca, cert_file=cert, key_file=key, keepalive_s=profile.mqtt.keepalive_s,
                         max_batch_size=_batch_limit(profile, bundle))


def _run_agent(args: argparse.Namespace) -> int:
    import logging
    import signal

    from edge_sdk.device.agent import DeviceAgent

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    settings = agent_settings(args)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    agent = DeviceAgent(settings)
    return agent.run(lambda: bool(stopping), max_rounds=args.rounds)


def _tls_files(args: argparse.Namespace, profile) -> tuple[str | None, str | None, str | None]:
    """--tls-* where given, else the profile's [tls] paths; a profile path that is missing is named now."""
    from edge_sdk.config import ProfileError

    files = []
    for option, given, key in (("--tls-ca", args.tls_ca, "ca"), ("--tls-cert", args.tls_cert, "cert"),
                               ("--tls-key", args.tls_key, "key")):
        path = getattr(profile.tls, key)
        if given is None and path is not None and not path.is_file():
            raise ProfileError(f"{profile.source}: [tls] {key} = {str(path)!r}: no such file (or give {option})")
        files.append(given if given is not None else None if path is None else str(path))
    return files[0], files[1], files[2]


def _batch_limit(profile, bundle: Path) -> int:
    """The largest plan batch size this device accepts: the profile's limit, lowered to what fits its memory."""
    from edge_sdk.config import ProfileError
    from edge_sdk.training.working_set import estimate, largest_batch_within, read_manifest

    manifest = read_manifest(bundle)
    if manifest is None:
        return profile.training.max_batch_size  # opening the bundle names what is wrong with it
    fits = largest_batch_within(manifest, profile.runtime.memory_budget_mb, profile.training.max_batch_size)
    if fits == 0:
        raise ProfileError(f"bundle {bundle} needs at least {estimate(manifest, 1).describe()} at batch size 1, "
                           f"above profile {profile.name}'s [runtime] memory_budget_mb "
                           f"{profile.runtime.memory_budget_mb} ({profile.source}): it does not fit this board")
    return fits


def run(args: argparse.Namespace) -> int:
    return {"init": _init, "budget": _budget, "run": _run_agent}[args.device_command](args)
