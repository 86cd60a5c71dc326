"""Device profiles load, and invalid ones fail with a message naming the field."""

import json

import pytest

from edge_sdk.config import PROFILES_DIR, DeviceProfile, load_profile
from edge_sdk.errors import ConfigError


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
def test_every_bundled_profile_loads_and_fits_its_memory(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.threads <= 4 and profile.memory_mb >= 512


def test_bundled_profiles_exist():
    assert {"pi-zero-2w", "pi4-2gb", "pi5-8gb"} <= {p.stem for p in PROFILES_DIR.glob("*.json")}


@pytest.mark.parametrize(
    ("override", "field"),
    [({"threads": 0}, "threads"), ({"batch_size": -1}, "batch_size"), ({"threads": True}, "threads"),
     ({"epsilon_budget": 0.0}, "epsilon_budget"), ({"delta": 1.0}, "delta")],
)
def test_invalid_profile_field_is_named(override, field):
    with pytest.raises(ConfigError, match=field):
        DeviceProfile.from_dict({"name": "x", "memory_mb": 512, **override})


def test_unknown_and_missing_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match="thread_count"):
        DeviceProfile.from_dict({"name": "x", "memory_mb": 512, "thread_count": 2})
    with pytest.raises(ConfigError, match="memory_mb"):
        DeviceProfile.from_dict({"name": "x"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="pi4-2gb"):
        load_profile("no-such-device")


def test_profile_from_file_path(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"name": "custom", "memory_mb": 1024, "threads": 2}))
    assert load_profile(path).threads == 2
