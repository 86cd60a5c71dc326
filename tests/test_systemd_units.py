"""The shipped systemd units: hardened, restart-limited, their commands valid fleetlearn commands.

Each unit is parsed and its hardening keys checked; its ExecStart is parsed by the real
``fleetlearn`` argument parser (so every option it names exists) with a profile that loads. Where
``systemd-analyze`` is on the machine, ``verify`` must accept each unit without a single warning
(an unknown or misspelt key is only a warning to systemd, so no output is the bar) and the offline
``security`` audit must rate it at most 2.0 ("OK"; 10 is an unhardened service).
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_sdk.cli import build_parser
from edge_sdk.config import load_profile

UNITS = Path(__file__).resolve().parents[1] / "firmware_configs"
NAMES = ["fleetlearn-device.service", "fleetlearn-aggregator.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HARDENING = {
    "User": "fleetlearn", "Group": "fleetlearn", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ReadWritePaths": "/var/lib/fleetlearn",
    "StateDirectory": "fleetlearn", "StateDirectoryMode": "0700", "CapabilityBoundingSet": "",
    "AmbientCapabilities": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "UMask": "0077",
    "Restart": "on-failure", "RestartPreventExitStatus": "2", "KillSignal": "SIGTERM",
}
MAX_EXPOSURE = 2.0


def parse(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)  # strict: a key given twice is an error
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((UNITS / name).read_text())
    return unit


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_is_hardened_and_restart_limited(name):
    unit = parse(name)
    service = unit["Service"]
    assert {k: service.get(k) for k in HARDENING} == HARDENING
    assert int(service["RestartSec"]) >= 5 and int(service["TimeoutStopSec"]) >= 10
    assert int(unit["Unit"]["StartLimitBurst"]) >= 3 and int(unit["Unit"]["StartLimitIntervalSec"]) >= 60
    assert "network-online.target" in unit["Unit"]["After"] and unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", NAMES)
def test_the_exec_start_is_a_valid_fleetlearn_command(name):
    argv = shlex.split(parse(name)["Service"]["ExecStart"])
    assert argv[0] == "/opt/fleetlearn/venv/bin/fleetlearn"
    args = build_parser(argv[1]).parse_args(argv[1:])  # an unknown option exits here
    if argv[1] == "device":
        assert args.device_command == "run" and args.state_dir == "/var/lib/fleetlearn"
        assert load_profile(args.profile).name == "pi-4"
        assert args.broker.startswith("mqtts://")
    else:
        assert args.aggregator_command == "serve" and args.config == "/etc/fleetlearn/aggregator.toml"


def runnable_copy(name: str, directory: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    text = (UNITS / name).read_text().replace("/opt/fleetlearn/venv/bin/fleetlearn", shutil.which("true"))
    path = directory / name
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is absent on this machine; the parsed "
                    "checks above still run")
@pytest.mark.parametrize("name", NAMES)
def test_systemd_accepts_each_unit_without_a_warning_and_rates_it_ok(name, tmp_path):
    path = runnable_copy(name, tmp_path)
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    misspelt = tmp_path / "misspelt" / name
    misspelt.parent.mkdir()
    misspelt.write_text(path.read_text().replace("ProtectSystem=", "ProtectSystm="))
    check = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(misspelt)], capture_output=True, text=True,
                           timeout=60)
    assert "Unknown key 'ProtectSystm'" in check.stderr  # the bar above can fail
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(path)], capture_output=True,
                              text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout + security.stderr)
    assert level is not None, security.stdout + security.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, security.stdout
