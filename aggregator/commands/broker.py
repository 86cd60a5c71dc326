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
    _add_certs_arguments(sub)
    _add_run_arguments(sub)


def _add_run_arguments(sub) -> None:
    embedded = sub.add_parser("run", help="run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground")
    embedded.add_argument("--bind", default="127.0.0.1",
                          help="listen address (default 127.0.0.1; 0.0.0.0 serves other machines, but without TLS "
                               "or passwords: a trusted network only)")
    embedded.add_argument("--port", type=integer_at_least(0), default=1883,
                          help="listen port (default 1883; 0: any free one)")
    embedded.add_argument("--max-connections", type=integer_at_least(0), default=0,
                          help="connections served at once; more wait for a free slot (default 0: no limit)")
    embedded.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                          help="amqtt's own log level (default WARNING)")


def _run_embedded(args: argparse.Namespace) -> int:
    from aggregator.broker.embedded import EmbeddedBrokerError, amqtt_version, serve_forever

    if args.port > 65535:
        raise EmbeddedBrokerError(f"--port {args.port}: a port is from 0 to 65535")

    def ready(url: str) -> None:
        sys.stdout.write(f"fleetlearn broker: serving {url} (embedded amqtt {amqtt_version()}, MQTT 3.1.1); "
                         "SIGTERM or Ctrl-C stops it\n")
        sys.stdout.flush()

    serve_forever(args.bind, args.port, max_connections=args.max_connections, log_level=args.log_level,
                  on_ready=ready)
    sys.stdout.write("fleetlearn broker: stopped\n")
    return 0


def _add_certs_arguments(sub) -> None:
    certs = sub.add_parser("certs", help="a pilot PKI: CA, broker, aggregator and device certificates, and a CRL")
    certs.add_argument("--out", required=True, metavar="DIR",
                       help="a new or empty directory, or one this command wrote before (files there are kept)")
    certs.add_argument("--fleet", required=True, help="the fleet id (names the CA)")
    who = certs.add_mutually_exclusive_group(required=True)
    who.add_argument("--store", metavar="PATH",
                     help="the aggregator's store: a certificate for every enrolled device, revoked ones on the CRL")
    who.add_argument("--device", action="append", metavar="ID", help="a device to certify (repeat for more)")
    certs.add_argument("--broker-host", action="append", metavar="NAME",
                       help="a DNS name or IP address of the broker, for its certificate (repeat; default "
                            "localhost and 127.0.0.1)")
    certs.add_argument("--days", type=integer_at_least(1), default=365,
                       help="validity of new certificates and of the CRL (default 365; rerun before the CRL expires)")
    certs.add_argument("--revoke", action="append", default=[], metavar="ID",
                       help="put this device's certificate on the CRL (repeat for more)")
    certs.add_argument("--aggregator-user", default="fleetlearn-aggregator",
                       help="the aggregator's broker user, its certificate's CN (default fleetlearn-aggregator)")


def _run_certs(args: argparse.Namespace) -> int:
    from aggregator.broker.certificates import DEFAULT_HOSTS, CertificateError, write_pki
    from aggregator.store import StoreError, open_store

    devices, revoked = list(args.device or []), list(args.revoke)
    if args.store is not None:
        store_path = Path(args.store)
        if not store_path.is_file():
            raise StoreError(f"--store {args.store}: no store there; enrol devices first with "
                             "`fleetlearn aggregator enrol`")
        with open_store(store_path) as store:
            records = store.devices(include_revoked=True)
        devices = [d.device_id for d in records if d.active]
        active = set(devices)
        refused = [device for device in revoked if device in active]
        if refused:
            raise CertificateError(f"--revoke {refused[0]}: the device is active in --store; revoke it there first "
                                   "with `fleetlearn aggregator revoke`")
        revoked = sorted({*revoked, *(d.device_id for d in records if not d.active)})
    report = write_pki(Path(args.out), args.fleet, devices, revoked=revoked,
                       hosts=args.broker_host or DEFAULT_HOSTS, days=args.days, aggregator_user=args.aggregator_user)
    new = sum(issued.new for issued in report.devices.values())
    out = Path(args.out)
    sys.stdout.write(
        f"wrote the PKI of fleet {args.fleet} into {out}: {len(report.devices)} device certificate(s) ({new} new), "
        f"{len(report.revoked)} revoked on {report.crl_path.name}"
        + (f" ({len(report.revoked_without_certificate)} revoked device(s) had no certificate here)"
           if report.revoked_without_certificate else "")
        + f"; configure the broker with: fleetlearn broker mosquitto-config --client-certs --tls-ca {out / 'ca.pem'} "
        f"--tls-cert {report.server.cert_path} --tls-key {report.server.key_path} ...\n"
    )
    return 0


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
    return TlsFiles.with_crl_beside_ca(Path(args.tls_ca), Path(args.tls_cert), Path(args.tls_key))


def run(args: argparse.Namespace) -> int:
    if args.broker_command == "certs":
        return _run_certs(args)
    if args.broker_command == "run":
        return _run_embedded(args)
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
