"""Device policies from a directory laid out like /sys and /proc: absent files mean no policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.device.eligibility import DevicePolicy, evaluate, read_conditions


def layout(root: Path, files: dict[str, str]) -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    (root / "sys").mkdir(exist_ok=True)
    (root / "proc").mkdir(exist_ok=True)
    return root / "sys", root / "proc"


BATTERY = "sys/class/power_supply/BAT0"
MAINS = "sys/class/power_supply/AC"
ZONE = "sys/class/thermal/thermal_zone"


def test_a_mains_powered_pi_without_sensors_is_eligible(tmp_path):
    sys_root, proc_root = layout(tmp_path, {})
    conditions = read_conditions(sys_root, proc_root, cpu_count=4)
    assert conditions.on_battery is None and conditions.cpu_celsius is None and conditions.load_per_cpu is None
    assert evaluate(DevicePolicy(require_charging=True), conditions).eligible


@pytest.mark.parametrize(
    ("files", "policy", "eligible", "detail"),
    [
        ({f"{BATTERY}/type": "Battery", f"{BATTERY}/status": "Discharging", f"{BATTERY}/capacity": "15"},
         DevicePolicy(), False, "battery at 15%"),
        ({f"{BATTERY}/type": "Battery", f"{BATTERY}/status": "Discharging", f"{BATTERY}/capacity": "80"},
         DevicePolicy(require_charging=True), False, "not charging"),
        ({f"{BATTERY}/type": "Battery", f"{BATTERY}/status": "Charging", f"{BATTERY}/capacity": "15"},
         DevicePolicy(require_charging=True), True, ""),
        ({f"{BATTERY}/type": "Battery", f"{BATTERY}/status": "Not charging", f"{BATTERY}/capacity": "10",
          f"{MAINS}/type": "Mains", f"{MAINS}/online": "1"}, DevicePolicy(require_charging=True), True, ""),
        ({f"{ZONE}0/temp": "48000", f"{ZONE}1/temp": "81500"}, DevicePolicy(), False, "CPU at 81.5 °C"),
        ({f"{ZONE}0/temp": "81500"}, DevicePolicy(max_cpu_celsius=None), True, ""),
        ({"proc/loadavg": "6.00 3.00 1.00 2/300 1234"}, DevicePolicy(), False, "load 1.50 per CPU"),
        ({"proc/loadavg": "2.00 3.00 1.00 2/300 1234"}, DevicePolicy(), True, ""),
        ({f"{ZONE}0/temp": "garbage"}, DevicePolicy(), True, ""),
    ],
)
def test_each_policy(tmp_path, files, policy, eligible, detail):
    sys_root, proc_root = layout(tmp_path, files)
    verdict = evaluate(policy, read_conditions(sys_root, proc_root, cpu_count=4))
    assert verdict.eligible is eligible and detail in verdict.detail


def test_the_real_sys_of_this_machine_reads_without_error():
    conditions = read_conditions()
    assert conditions.load_per_cpu is not None  # /proc/loadavg exists on every Linux
