"""``fleetlearn broker mosquitto-config``: a Mosquitto configuration with TLS and a per-device ACL.

Rerun it after ``fleetlearn aggregator enrol`` or ``revoke`` and send Mosquitto a SIGHUP: only
enrolled, unrevoked devices get ACL lines; passwords already written are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_sdk.commands._arguments import integer_at_least

NAME = "broker"
HELP = "write a Mosquitto configuration (TLS, passwords, per-device ACL) for a fleet (mosquitto-config)"
EXTRA = "host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="broker_command", metavar="ACTION", required=True, parser_class=type(parser))
    config = sub.add_parser("mosquitto-config", help="write mosquitto.conf, an ACL and a password file into --out")
    config.add_argument("--out", required=True, metavar="DIR",
                        help="a new or empty directory, or one this command wrote before (brought up to date)")
    config.add_argument("--fleet", required=True, help="the fleet id (the topic level after fleetlearn/v1/)")
    config.add_argument("--store", required=True, metavar="PATH", help="the aggregator's store (enrolled devices)")
    config.add_argument("--port", type=integer_at_least(1), default=None,
                        help="listener port (default 8883 with TLS, 1883 without)")
    config.add_argument("--bind", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    config.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the client certificates")
    config.add_argument("--tls-cert", metavar="PEM", help="the broker's certificate")
    config.add_argument("--tls-key", metavar="PEM", help="the broker's private key")
    config.add_argument("--client-certs", action="store_true",
                        help="authenticate devices by TLS client certificate (CN = device id) instead of passwords")
    config.add_argument("--aggregator-user", default="fleetlearn-aggregator",
                        help="the aggregator's broker user name (default fleetlearn-aggregator)")
    config.add_argument("--run-as", metavar="USER",
                        help="the user Mosquitto runs as when started as root (it must be able to read --out)")
    config.add_argument("--max-queued-messages", type=integer_at_least(1), default=1000,
                        help="Mosquitto's per-client queue limit (default 1000, Mosquitto's own)")


def _tls(args: argparse.Namespace):
    from aggregator.broker.mosquitto_config import BrokerConfigError, TlsFiles

    given = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise BrokerConfigError(f"TLS needs --tls-ca, --tls-cert and --tls-key together; missing {', '.join(missing)}")
    for name, value in given.items():
        if not Path(value).is_file():
            raise BrokerConfigError(f"{name} {value}: no such file")
    return TlsFiles(Path(args.tls_ca), Path(args.tls_cert), Path(args.tls_key))


def run(args: argparse.Namespace) -> int:
    from aggregator.broker.mosquitto_config import write
    from aggregator.store import StoreError, open_store

    tls = _tls(args)
    store_path = Path(args.store)
    if not store_path.is_file():
        raise StoreError(
            f"--store {args.store}: no store there; enrol devices first with `fleetlearn aggregator enrol`"
        )
    with open_store(store_path) as store:
        devices = [d.device_id for d in store.devices(include_revoked=False)]
    port = args.port or (8883 if tls else 1883)
    out = Path(args.out)
    write(out, args.fleet, devices, port=port, bind=args.bind, tls=tls, client_certs=args.client_certs,
          aggregator_user=args.aggregator_user, max_queued_messages=args.max_queued_messages, run_as=args.run_as)
    auth = "client certificates (CN = device id)" if args.client_certs else f"passwords in {out / 'secrets'}"
    sys.stdout.write(
        f"wrote {out / 'mosquitto.conf'} for fleet {args.fleet}: {len(devices)} device(s), {auth}; "
        f"start it with: mosquitto -c {out / 'mosquitto.conf'}\n"
    )
    return 0
