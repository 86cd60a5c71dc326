"""Device profiles: per-hardware settings a device reads at start-up.

A profile is a small JSON file. The bundled ones live in ``edge_sdk/profiles/`` and ship in the
wheel as package data (``firmware_configs/profiles`` is a link to that directory, the one copy).
It fixes the knobs that depend on the hardware: onnxruntime threads, batch size, how many local
epochs a round may take, and the device's privacy budget. Invalid values are a ``ConfigError`` naming the field,
so a typo fails at start-up instead of mid-round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    """Hardware-dependent settings of one device class."""

    name: str
    memory_mb: int
    threads: int = 1
    batch_size: int = 32
    local_epochs: int = 1
    epsilon_budget: float = 10.0
    delta: float = 1e-6

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("profile field 'name' must be a non-empty string")
        for field_name in ("memory_mb", "threads", "batch_size", "local_epochs"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"profile {self.name!r}: field {field_name!r} must be an integer >= 1, got {value!r}")
        if not self.epsilon_budget > 0:
            raise ConfigError(f"profile {self.name!r}: field 'epsilon_budget' must be > 0, got {self.epsilon_budget!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"profile {self.name!r}: field 'delta' must be in (0, 1), got {self.delta!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown profile field(s) {unknown}; known fields are {sorted(known)}")
        missing = sorted(f for f in ("name", "memory_mb") if f not in data)
        if missing:
            raise ConfigError(f"profile is missing required field(s) {missing}")
        return cls(**data)


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a profile by file path (anything with a suffix), or by name from the bundled profiles."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise ConfigError(f"device profile {str(name_or_path)!r} not found; bundled profiles: {available}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"device profile {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"device profile {path} must hold a JSON object")
    return DeviceProfile.from_dict(data)
