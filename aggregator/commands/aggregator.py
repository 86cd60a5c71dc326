"""``fleetlearn aggregator``: enrol, revoke and list devices in the store, and serve rounds.

Every bad input is one line and exit code 2, and nothing in the store changes: each change is one
transaction that either commits whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

NAME = "aggregator"
HELP = "the aggregator: enrol, revoke and list devices (enrol, revoke, devices), its key (key), run rounds (serve)"
EXTRA = "host"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="aggregator_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    enrol = sub.add_parser("enrol", help="enrol a device's Ed25519 identity key (printed by `fleetlearn device init`)")
    enrol.add_argument("--store", required=True, metavar="PATH", help="the aggregator's store (created if missing)")
    enrol.add_argument("--device", required=True, metavar="ID", help="the device id (1-128 bytes, no / + #)")
    enrol.add_argument("--public-key", required=True, metavar="HEX", help="the device's public key, 64 hex digits")
    revoke = sub.add_parser("revoke", help="revoke a device: it leaves the directory, its history stays")
    revoke.add_argument("--store", required=True, metavar="PATH", help="the aggregator's store")
    revoke.add_argument("--device", required=True, metavar="ID", help="the device to revoke")
    revoke.add_argument("--reason", default="", help="why (kept in the store)")
    devices = sub.add_parser("devices", help="list enrolled devices")
    devices.add_argument("--store", required=True, metavar="PATH", help="the aggregator's store")
    devices.add_argument("--active", action="store_true", help="only devices that are not revoked")
    devices.add_argument("--json", action="store_true", help="one JSON object per line")
    serve = sub.add_parser("serve", help="run the aggregator service with aggregator.toml")
    serve.add_argument("--config", required=True, metavar="FILE", help="aggregator.toml")
    coordinator = sub.add_parser("coordinator", help="run the sharding coordinator: plans, cohorts, sub-cohort tasks, "
                                 "the sum of sub-sums, accounting and publication ([sharding] in aggregator.toml)")
    coordinator.add_argument("--config", required=True, metavar="FILE", help="aggregator.toml")
    worker = sub.add_parser("worker", help="run an aggregator worker: SecAgg+ for the sub-cohorts it is handed")
    worker.add_argument("--config", required=True, metavar="FILE", help="aggregator.toml (the coordinator's)")
    worker.add_argument("--worker-id", required=True, metavar="ID", help="this worker's id (an MQTT topic level)")
    key = sub.add_parser("key", help="print the aggregator's public key (made on first use) for `device init`")
    key.add_argument("--config", required=True, metavar="FILE", help="aggregator.toml")


def _store(path_text: str, *, must_exist: bool):
    from aggregator.store import StoreError, open_store

    path = Path(path_text)
    if must_exist and not path.is_file():
        raise StoreError(f"--store {path_text}: no store there; `fleetlearn aggregator enrol` creates it")
    return open_store(path)


def _public_key(text: str) -> bytes:
    from aggregator.store import StoreError
    from edge_sdk.secagg.keys import KEY_BYTES

    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise StoreError(f"--public-key must be {2 * KEY_BYTES} hex digits, got {text[:20]!r}") from None
    if len(key) != KEY_BYTES:
        raise StoreError(f"--public-key must be {2 * KEY_BYTES} hex digits ({KEY_BYTES} bytes), got {len(key)} bytes")
    return key


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _enrol(args: argparse.Namespace) -> int:
    from aggregator.store import check_device_id

    check_device_id(args.device)
    key = _public_key(args.public_key)
    with _store(args.store, must_exist=False) as store:
        store.enrol(args.device, key, now=time.time())
    sys.stdout.write(f"enrolled device {args.device} (public key {key.hex()}) in {args.store}\n")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _store(args.store, must_exist=True) as store:
        record = store.revoke(args.device, now=time.time(), reason=args.reason)
    sys.stdout.write(f"revoked device {record.device_id} at {_when(record.revoked_at)}; rerun "
                     "`fleetlearn broker mosquitto-config` so the broker drops it\n")
    return 0


def _devices(args: argparse.Namespace) -> int:
    with _store(args.store, must_exist=True) as store:
        devices = store.devices(include_revoked=not args.active)
    for d in devices:
        if args.json:
            sys.stdout.write(json.dumps({
                "device": d.device_id, "public_key": d.public_key.hex(), "enrolled_at": d.enrolled_at,
                "revoked_at": d.revoked_at, "revoke_reason": d.revoke_reason,
            }, sort_keys=True) + "\n")
        else:
            state = "active" if d.active else f"revoked {_when(d.revoked_at)}" + (
                f" ({d.revoke_reason})" if d.revoke_reason else "")
            sys.stdout.write(f"{d.device_id}\t{d.public_key.hex()}\tenrolled {_when(d.enrolled_at)}\t{state}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aggregator.service.config import load_config
    from aggregator.service.service import serve

    return serve(load_config(args.config))  # a bad config is one line and exit 2, before anything starts


def _coordinator(args: argparse.Namespace) -> int:
    from aggregator.service.config import load_config
    from aggregator.sharding.coordinator_service import serve_coordinator

    return serve_coordinator(load_config(args.config))


def _worker(args: argparse.Namespace) -> int:
    from aggregator.service.config import ServiceConfigError, load_config
    from aggregator.sharding.worker_service import serve_worker
    from edge_sdk.errors import FleetlearnError
    from edge_sdk.protocol.plan import check_identifier

    try:
        check_identifier(args.worker_id, "--worker-id")
    except FleetlearnError as exc:
        raise ServiceConfigError(str(exc)) from None
    return serve_worker(load_config(args.config), args.worker_id)


def _key(args: argparse.Namespace) -> int:
    from aggregator.service.config import load_config
    from aggregator.service.service import load_or_create_identity

    config = load_config(args.config)
    config.fleet.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_or_create_identity(config.identity_path)
    sys.stdout.write(f"{identity.public.hex()}\n")
    sys.stderr.write(f"the aggregator's public key ({config.identity_path}); provision devices with: fleetlearn "
                     f"device init --state-dir DIR --fleet {config.fleet.id} --aggregator-key "
                     f"{identity.public.hex()}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"enrol": _enrol, "revoke": _revoke, "devices": _devices, "serve": _serve,
            "coordinator": _coordinator, "worker": _worker, "key": _key}[args.aggregator_command](args)
