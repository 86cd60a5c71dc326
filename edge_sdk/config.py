"""Device profiles: per-board settings a device reads at start-up, from a TOML file.

The bundled profiles live in ``edge_sdk/profiles/*.toml`` and ship in the wheel as package data
(``firmware_configs/profiles`` is a link to that directory, the one copy). A profile fixes what
depends on the hardware: onnxruntime threads and a memory budget (``[runtime]``), batch-size
limits (``[training]``), the device's privacy budget (``[privacy]``), the MQTT keepalive
(``[mqtt]``), TLS file paths (``[tls]``) and the local eligibility policy (``[eligibility]``).

Why strict: a profile is edited by hand on a device nobody watches. A typo (``thread = 2``), a
string where a number belongs or a value the board cannot honour (9 threads on 4 cores) stops the
device at start-up with one line naming the file, the key and the allowed values, instead of a
device that silently trains with defaults or runs out of memory mid-round. Unknown sections and
keys are refused for the same reason. Ranges that depend on the board (threads, memory budget)
are checked against its ``[board]`` section, which is read first.

The stdlib ``tomllib`` reads the file: the device side depends on onnxruntime, numpy, paho-mqtt
and cryptography only, which is why fleetlearn needs Python 3.11.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.errors import ConfigError

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
SUFFIX = ".toml"
# The names of the first bundled profiles (JSON, before the TOML ones): they still load, as the board they named.
ALIASES = {"pi4-2gb": "pi-4", "pi5-8gb": "pi-5"}
OFF = "off"  # an eligibility rule switched off (TOML has no null)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


class ProfileError(ConfigError):
    """A device profile is missing, unreadable, or holds an unknown key or a value out of range."""


@dataclass(frozen=True)
class BoardSection:
    """``[board]``: what the hardware is; the ranges of ``[runtime]`` come from it."""

    name: str
    cores: int
    memory_mb: int  # the RAM the profile assumes
    description: str = ""


@dataclass(frozen=True)
class RuntimeSection:
    """``[runtime]``: onnxruntime intra-op threads, and the memory training may take."""

    threads: int
    memory_budget_mb: int


@dataclass(frozen=True)
class TrainingSection:
    """``[training]``: the batch size ``train`` uses by default, and the largest this board accepts."""

    default_batch_size: int
    max_batch_size: int


@dataclass(frozen=True)
class PrivacySection:
    """``[privacy]``: the (epsilon, delta) budget ``device init --profile`` writes into the ledger."""

    epsilon_budget: float = 10.0
    delta: float = 1e-6


@dataclass(frozen=True)
class MqttSection:
    """``[mqtt]``: how often the connection is checked; the broker declares the device gone after 1.5x."""

    keepalive_s: int = 60


@dataclass(frozen=True)
class TlsSection:
    """``[tls]``: CA, client certificate and key; relative paths are relative to the profile file."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class EligibilitySection:
    """``[eligibility]``: when the device may train; ``None`` (``"off"`` in the file) switches a rule off."""

    min_battery: float | None = DevicePolicy.min_battery_percent
    require_charging: bool = DevicePolicy.require_charging
    max_cpu_celsius: float | None = DevicePolicy.max_cpu_celsius
    max_load_per_cpu: float | None = DevicePolicy.max_load_per_cpu

    def policy(self) -> DevicePolicy:
        return DevicePolicy(require_charging=self.require_charging, min_battery_percent=self.min_battery,
                            max_cpu_celsius=self.max_cpu_celsius, max_load_per_cpu=self.max_load_per_cpu)


@dataclass(frozen=True)
class DeviceProfile:
    """One board's settings, one frozen section each."""

    board: BoardSection
    runtime: RuntimeSection
    training: TrainingSection
    privacy: PrivacySection = field(default_factory=PrivacySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    tls: TlsSection = field(default_factory=TlsSection)
    eligibility: EligibilitySection = field(default_factory=EligibilitySection)
    source: str = ""  # the file it was read from, for messages

    @property
    def name(self) -> str:
        return self.board.name

    @property
    def threads(self) -> int:
        return self.runtime.threads

    @property
    def batch_size(self) -> int:
        return self.training.default_batch_size

    @property
    def epsilon_budget(self) -> float:
        return self.privacy.epsilon_budget

    @property
    def delta(self) -> float:
        return self.privacy.delta

    def check_batch_size(self, batch_size: int, what: str = "--batch-size") -> None:
        """Refuse a batch size above this board's ``[training] max_batch_size``."""
        limit = self.training.max_batch_size
        if batch_size > limit:
            raise ProfileError(f"{what} {batch_size} is above profile {self.name}'s [training] max_batch_size "
                               f"{limit} ({self.source}); use at most {limit}")

    def check_memory(self, bundle: str | os.PathLike[str], batch_size: int) -> None:
        """Refuse a bundle whose working set at ``batch_size`` certainly exceeds ``[runtime] memory_budget_mb``.

        The estimate is a lower bound from the manifest (``edge_sdk.training.working_set``); an
        unreadable manifest is left to the bundle loader, which names what is wrong with it.
        """
        from edge_sdk.training.working_set import estimate, largest_batch_within, read_manifest

        manifest = read_manifest(bundle)
        if manifest is None:
            return
        budget = self.runtime.memory_budget_mb
        need = estimate(manifest, batch_size)
        if need.total <= budget << 20:
            return
        fits = largest_batch_within(manifest, budget, self.training.max_batch_size)
        advice = (f"the largest batch size that fits is {fits}" if fits else
                  "this model does not fit at any batch size; use a smaller model or a board with more memory")
        raise ProfileError(f"bundle {os.fspath(bundle)} at batch size {batch_size} needs at least {need.describe()}, "
                           f"above profile {self.name}'s [runtime] memory_budget_mb {budget} ({self.source}); "
                           f"{advice}")


# -- the validator -----------------------------------------------------------------------------------

_REQUIRED = object()  # a key with no default


class _Section:
    """One table of the file being read: every value taken from it is checked and named in errors."""

    def __init__(self, where: str, name: str, table: Mapping[str, Any], keys: tuple[str, ...]) -> None:
        self.where, self.name, self.table = where, name, table
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ProfileError(f"{self._key(unknown[0])} = {table[unknown[0]]!r}: unknown key; allowed keys in "
                               f"[{name}]: {', '.join(sorted(keys))}")

    def _key(self, key: str) -> str:
        return f"{self.where}: [{self.name}] {key}"

    def _take(self, key: str, allowed: str, check: Callable[[Any], bool], default: Any) -> Any:
        if key not in self.table:
            if default is _REQUIRED:
                raise ProfileError(f"{self._key(key)} is missing: allowed {allowed}")
            return default
        value = self.table[key]
        if not check(value):
            raise ProfileError(f"{self._key(key)} = {_show(value)}: allowed {allowed}")
        return value

    def integer(self, key: str, low: int, high: int, why: str = "", default: Any = None) -> int:
        def ok(v: Any) -> bool:
            return _is_int(v) and low <= v <= high

        return self._take(key, f"{low}..{high}{f' ({why})' if why else ''}", ok,
                          _REQUIRED if default is None else default)

    def number(self, key: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False,
               off: bool = False, default: Any = None) -> float | None:
        def ok(v: Any) -> bool:
            if off and v == OFF:
                return True
            if not _is_number(v) or not math.isfinite(v):
                return False
            return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

        allowed = f"a number {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        allowed += f" or {OFF!r}" if off else ""
        value = self._take(key, allowed, ok, _REQUIRED if default is None and not off else default)
        return None if value == OFF else float(value) if value is not None else None

    def boolean(self, key: str, default: bool) -> bool:
        return self._take(key, "true or false", lambda v: isinstance(v, bool), default)

    def text(self, key: str, allowed: str, check: Callable[[str], bool], default: Any = _REQUIRED) -> Any:
        return self._take(key, allowed, lambda v: isinstance(v, str) and check(v), default)



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)


SECTIONS: dict[str, tuple[str, ...]] = {
    "board": ("name", "description", "cores", "memory_mb"),
    "runtime": ("threads", "memory_budget_mb"),
    "training": ("default_batch_size", "max_batch_size"),
    "privacy": ("epsilon_budget", "delta"),
    "mqtt": ("keepalive_s",),
    "tls": ("ca", "cert", "key"),
    "eligibility": ("min_battery", "require_charging", "max_cpu_celsius", "max_load_per_cpu"),
}
REQUIRED_SECTIONS = ("board", "runtime", "training")
MAX_CORES = 256
MIN_MEMORY_BUDGET_MB = 32
MAX_BATCH = 65536
MQTT_MAX_KEEPALIVE_S = 65535  # a 16-bit field in CONNECT
MIN_KEEPALIVE_S = 5  # MqttSettings' floor


def parse_profile(data: Mapping[str, Any], where: str, base_dir: Path | None = None) -> DeviceProfile:
    """Validate a parsed profile; ``where`` names the file in errors, ``base_dir`` anchors relative TLS paths."""
    allowed = ", ".join(f"[{s}]" for s in SECTIONS)
    for key, value in data.items():
        if key not in SECTIONS and not isinstance(value, dict):
            home = [s for s, keys in SECTIONS.items() if key in keys]
            hint = f"; {key} belongs in [{home[0]}]" if home else ""
            raise ProfileError(f"{where}: {key} = {_show(value)}: keys belong in a section; allowed sections: "
                               f"{allowed}{hint}")
        if key not in SECTIONS:
            raise ProfileError(f"{where}: [{key}]: unknown section; allowed sections: {allowed}")
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: {key} = {_show(value)}: keys belong in a section; write [{key}] and its "
                               f"keys ({', '.join(SECTIONS[key])})")
    missing = [s for s in REQUIRED_SECTIONS if s not in data]
    if missing:
        raise ProfileError(f"{where}: section [{missing[0]}] is missing: it needs {', '.join(SECTIONS[missing[0]])}")

    def section(name: str) -> _Section:
        return _Section(where, name, data.get(name, {}), SECTIONS[name])

    s = section("board")
    cores = s.integer("cores", 1, MAX_CORES)
    memory_mb = s.integer("memory_mb", 128, 1 << 20)
    board = BoardSection(s.text("name", "a lower-case name of letters, digits and '-' (at most 64)",
                                lambda v: _NAME.fullmatch(v) is not None),
                         cores, memory_mb, s.text("description", "a string", lambda v: True, default=""))
    s = section("runtime")
    runtime = RuntimeSection(s.integer("threads", 1, cores, "cores of this board"),
                             s.integer("memory_budget_mb", MIN_MEMORY_BUDGET_MB, memory_mb,
                                       "up to the board's memory_mb"))
    s = section("training")
    max_batch = s.integer("max_batch_size", 1, MAX_BATCH)
    training = TrainingSection(s.integer("default_batch_size", 1, max_batch, "up to max_batch_size"), max_batch)
    s = section("privacy")
    privacy = PrivacySection(s.number("epsilon_budget", 0.0, 1e6, open_low=True, default=PrivacySection.epsilon_budget),
                             s.number("delta", 0.0, 1.0, open_low=True, open_high=True, default=PrivacySection.delta))
    s = section("mqtt")
    mqtt = MqttSection(s.integer("keepalive_s", MIN_KEEPALIVE_S, MQTT_MAX_KEEPALIVE_S, "seconds",
                                 default=MqttSection.keepalive_s))
    s = section("tls")
    paths = {key: s.text(key, "a file path (a non-empty string)", lambda v: bool(v.strip()), default=None)
             for key in ("ca", "cert", "key")}
    if (paths["cert"] is None) != (paths["key"] is None):
        given = "cert" if paths["cert"] is not None else "key"
        raise ProfileError(f"{where}: [tls] {given} is given alone: allowed cert and key together (mTLS) or neither")
    tls = TlsSection(**{k: None if v is None else _anchor(Path(v), base_dir) for k, v in paths.items()})
    s = section("eligibility")
    default = EligibilitySection()
    eligibility = EligibilitySection(
        min_battery=s.number("min_battery", 0.0, 100.0, off=True, default=default.min_battery),
        require_charging=s.boolean("require_charging", default.require_charging),
        max_cpu_celsius=s.number("max_cpu_celsius", 0.0, 125.0, off=True, default=default.max_cpu_celsius),
        max_load_per_cpu=s.number("max_load_per_cpu", 0.0, 64.0, off=True, default=default.max_load_per_cpu),
    )
    return DeviceProfile(board, runtime, training, privacy, mqtt, tls, eligibility, source=where)


def _anchor(path: Path, base_dir: Path | None) -> Path:
    return path if path.is_absolute() or base_dir is None else base_dir / path


def bundled_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob(f"*{SUFFIX}"))


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a profile by file path (anything with a suffix or a directory part), or by bundled name."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not path.suffix and os.sep not in text:
        if text in ALIASES:
            log.info("device profile %r is now called %r", text, ALIASES[text])
            text = ALIASES[text]
        path = PROFILES_DIR / f"{text}{SUFFIX}"
        if not path.is_file():
            raise ProfileError(f"device profile {str(name_or_path)!r} not found; bundled profiles: "
                               f"{', '.join(bundled_profiles())} (or give a path to a .toml file)")
    elif not path.is_file():
        raise ProfileError(f"device profile {text}: no such file")
    where = f"profile {path.name}" if path.parent == PROFILES_DIR else f"profile {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    return parse_profile(data, where, path.parent.resolve())
