"""Whether the device may take part now: charging or battery, CPU temperature and idleness, read from /sys.

Why read /sys directly: a Pi-class device has no battery daemon to ask, and the kernel exposes
the facts as small text files (``/sys/class/power_supply/*/{type,status,online,capacity}``,
``/sys/class/thermal/thermal_zone*/temp`` in millidegrees, ``/proc/loadavg``). A file that is
absent means "no policy": a mains-powered Pi without a battery is never held back for not charging.

``read_conditions`` is the I/O (a root directory is passed in, so a test hands it a directory laid
out like /sys); ``evaluate`` is pure. The privacy budget is checked separately, by the ledger.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class DevicePolicy:
    """The local rules; ``None`` switches a rule off."""

    require_charging: bool = False  # only when on mains or charging (when a battery is present)
    min_battery_percent: float | None = 20.0  # when on battery
    max_cpu_celsius: float | None = 75.0  # the hottest thermal zone
    max_load_per_cpu: float | None = 1.0  # the 1-minute load average divided by the CPU count: "idle"

    def __post_init__(self) -> None:
        for name in ("min_battery_percent", "max_cpu_celsius", "max_load_per_cpu"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"device policy {name} must be a finite number >= 0 or None, got {value}")


@dataclass(frozen=True)
class DeviceConditions:
    """What the kernel reports; ``None`` where it reports nothing."""

    on_battery: bool | None = None  # a battery is present and no mains supply is online
    charging: bool | None = None
    battery_percent: float | None = None
    cpu_celsius: float | None = None
    load_per_cpu: float | None = None


@dataclass(frozen=True)
class Verdict:
    eligible: bool
    detail: str = ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_conditions(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
                    cpu_count: int | None = None) -> DeviceConditions:
    """Read the power supplies, the thermal zones and the load average; what is missing stays None."""
    batteries: list[tuple[str | None, float | None]] = []
    mains_online: bool | None = None
    supplies = sys_root / "class" / "power_supply"
    for supply in sorted(supplies.iterdir()) if supplies.is_dir() else ():
        kind = _read(supply / "type")
        if kind == "Battery":
            batteries.append((_read(supply / "status"), _number(_read(supply / "capacity"))))
        elif kind in ("Mains", "USB", "USB_C", "USB_PD"):
            online = _read(supply / "online")
            if online is not None:
                mains_online = bool(mains_online) or online == "1"
    on_battery = charging = percent = None
    if batteries:
        statuses = [s for s, _ in batteries if s is not None]
        charging = any(s in ("Charging", "Full") for s in statuses) if statuses else None
        on_battery = not mains_online and not charging if (mains_online is not None or statuses) else None
        levels = [c for _, c in batteries if c is not None]
        percent = min(levels) if levels else None
    zones = sys_root / "class" / "thermal"
    temps = [_number(_read(zone / "temp")) for zone in sorted(zones.glob("thermal_zone*"))] if zones.is_dir() else []
    temps = [t / 1000.0 for t in temps if t is not None]
    load = _read(proc_root / "loadavg")
    one_minute = _number(load.split()[0]) if load else None
    cpus = cpu_count or os.cpu_count() or 1
    return DeviceConditions(on_battery, charging, percent, max(temps) if temps else None,
                            one_minute / cpus if one_minute is not None else None)


def evaluate(policy: DevicePolicy, conditions: DeviceConditions) -> Verdict:
    """Apply the policy to what was read; a rule whose fact is unknown does not hold the device back."""
    c = conditions
    if policy.require_charging and c.on_battery is True and not c.charging:
        return Verdict(False, "on battery and not charging (the policy requires charging)")
    if policy.min_battery_percent is not None and c.on_battery and c.battery_percent is not None \
            and c.battery_percent < policy.min_battery_percent:
        return Verdict(False, f"battery at {c.battery_percent:g}%, below {policy.min_battery_percent:g}%")
    if policy.max_cpu_celsius is not None and c.cpu_celsius is not None and c.cpu_celsius > policy.max_cpu_celsius:
        return Verdict(False, f"CPU at {c.cpu_celsius:.1f} °C, above {policy.max_cpu_celsius:g} °C")
    if policy.max_load_per_cpu is not None and c.load_per_cpu is not None and c.load_per_cpu > policy.max_load_per_cpu:
        return Verdict(False, f"busy: load {c.load_per_cpu:.2f} per CPU, above {policy.max_load_per_cpu:g}")
    return Verdict(True)
