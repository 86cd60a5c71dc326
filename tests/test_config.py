"""``load_profile``: a bundled name, an old name, or a path; what it cannot read is named.

The validation of every key is in tests/test_profiles.py.
"""

import pytest

from edge_sdk.config import ALIASES, PROFILES_DIR, ProfileError, bundled_profiles, load_profile
from edge_sdk.errors import ConfigError


def test_a_profile_error_is_a_config_error():
    assert issubclass(ProfileError, ConfigError)


def test_every_alias_names_a_shipped_profile():
    assert set(ALIASES.values()) <= set(bundled_profiles())


def test_profile_from_a_path_with_any_suffix_or_none(tmp_path):
    text = (PROFILES_DIR / "pi-4.toml").read_text().replace('name = "pi-4"', 'name = "lab-pi"')
    for name in ("lab.toml", "lab.conf"):
        (tmp_path / name).write_text(text)
        assert load_profile(tmp_path / name).name == "lab-pi"
    (tmp_path / "plain").write_text(text)
    assert load_profile(str(tmp_path / "plain")).name == "lab-pi"  # a directory part makes it a path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no such file"),
    (lambda p: p.write_bytes(b"\xff\xfe[board]"), "cannot read it"),
])
def test_what_cannot_be_read_is_named(tmp_path, make, message):
    path = tmp_path / "device.toml"
    make(path)
    with pytest.raises(ProfileError, match=message) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)
