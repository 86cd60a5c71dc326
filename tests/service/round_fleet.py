"""A fleet on disk for the round-over-MQTT tests: a digits bundle, device state directories, a store, a config.

Everything is real: the bundle is compiled from the 64-16-10 MLP, each device's state directory is
made by `fleetlearn device init` (identity, ledger, provisioned aggregator key) and enrolled in the
aggregator's SQLite store, and aggregator.toml is a file the service reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.service.service import load_or_create_identity
from aggregator.store import open_store
from edge_sdk.cli import main as cli_main
from edge_sdk.secagg.keys import IdentityKey

ROOT = Path(__file__).resolve().parents[2]
FLEET = "digits"
BUDGET = 1e300  # the device budget: large enough for the near-noiseless rounds the exact test runs


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.data))
    return (d.data[order] / 16.0).astype(np.float32), d.target[order].astype(np.int64)


def build_bundle(directory: Path) -> Path:
    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    bundle = directory / "bundle"
    if not bundle.exists():
        compile_model(model_zoo.mlp((64, 16, 10), seed=0), bundle, loss="cross_entropy", optimizer="sgd")
    return bundle


@dataclass
class FleetOnDisk:
    root: Path
    bundle: Path
    config: Path
    state_dir: Path  # the aggregator's
    devices: dict[str, Path]  # device id -> state directory
    heldout: Path
    aggregator_public: bytes

    def data_of(self, device: str) -> Path:
        return self.devices[device] / "data.npz"


def config_text(state_dir: Path, bundle: Path, broker_url: str, heldout: Path | None, **sections: dict) -> str:
    base = {
        "fleet": {"id": FLEET, "state_dir": str(state_dir)},
        "broker": {"urls": [broker_url]},
        "model": {"bundle": str(bundle)},
        "rounds": {"count": 3, "cohort_min": 3, "cohort_max": 10, "over_selection": 0.0, "interval": 0.0,
                   "check_back_after": 0.0},
        "deadlines": {"ready": 20.0, "train": 30.0, "secagg_stage": 10.0},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.2, "seed": 0},
        "privacy": {"mode": "distributed", "mechanism": "skellam", "delta": 1e-5, "clip": 1.0, "bits": 24,
                    "noise_multiplier": 1e-9, "dropout": 0.1, "colluding": 0.05},
        "strategy": {"name": "fedavg"},
        "metrics": {"enabled": False},
    }
    if heldout is not None:
        base["evaluation"] = {"data": str(heldout)}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def make_fleet(root: Path, n: int, broker_url: str, bundle_cache: Path, **sections: dict) -> FleetOnDisk:
    """``n`` initialised, enrolled devices with digits shards, and an aggregator config for ``broker_url``."""
    bundle = build_bundle(bundle_cache)
    x, y = digits()
    cut = int(0.75 * len(x))
    heldout = root / "heldout.npz"
    np.savez(heldout, x=x[cut:], y=y[cut:])
    state_dir = root / "aggregator"
    state_dir.mkdir(mode=0o700)
    config = root / "aggregator.toml"
    config.write_text(config_text(state_dir, bundle, broker_url, heldout, **sections))
    identity = load_or_create_identity(state_dir / "aggregator.key")
    devices = {}
    shards = np.array_split(np.arange(cut), n)
    with open_store(state_dir / "aggregator.sqlite") as store:
        for i, shard in enumerate(shards):
            device = f"dev-{i:02d}"
            directory = root / device
            assert cli_main(["device", "init", "--state-dir", str(directory), "--device-id", device, "--epsilon",
                             str(BUDGET), "--delta", "1e-5", "--fleet", FLEET, "--aggregator-key",
                             identity.public.hex()]) == 0
            np.savez(directory / "data.npz", x=x[shard], y=y[shard])
            private = bytes.fromhex((directory / "identity.key").read_text().strip())
            store.enrol(device, IdentityKey(private).public, now=time.time())
            devices[device] = directory
    return FleetOnDisk(root, bundle, config, state_dir, devices, heldout, identity.public)


def device_command(fleet: FleetOnDisk, device: str, broker_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_sdk.cli", "device", "run", "--profile", "pi4-2gb", "--state-dir",
            str(fleet.devices[device]), "--broker", broker_url, "--bundle", str(fleet.bundle), "--data",
            str(fleet.data_of(device)), "--max-load-per-cpu", "off", "--max-cpu-celsius", "off",
            "--min-battery", "off", *extra]


def aggregator_command(fleet: FleetOnDisk, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_sdk.cli", "-vv", "aggregator", "serve", "--config", str(fleet.config),
            *extra]


@dataclass
class Process:
    """An OS process whose stderr lines are collected by a reader thread (the test parses the JSON ones)."""

    name: str
    popen: subprocess.Popen
    lines: deque = field(default_factory=deque)
    all_lines: list = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, argv: list[str]) -> Process:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, bufsize=1)
        process = cls(name, popen)
        process.reader = threading.Thread(target=process._read, daemon=True)
        process.reader.start()
        return process

    def _read(self) -> None:
        for line in self.popen.stderr:
            self.lines.append(line)
            self.all_lines.append(line)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def text(self) -> str:
        return "".join(self.all_lines)


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
