"""aggregator.toml: the example loads, and every invalid value is refused naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.service.config import ServiceConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "fleet": {"id": "digits", "state_dir": "state"},
    "broker": {"urls": ["mqtt://localhost:1883"]},
    "model": {"bundle": "bundle"},
}


def with_value(section: str, key: str, value) -> dict:
    data = {name: dict(table) for name, table in MINIMAL.items()}
    data.setdefault(section, {})[key] = value
    return data


def test_the_shipped_example_loads_with_every_key():
    config = load_config(ROOT / "firmware_configs" / "aggregator.toml")
    assert config.fleet.id == "digits" and config.broker.tls is not None
    assert config.rounds.cohort_min == 10 and config.strategy.settings == {"server_lr": 1.0}
    assert config.metrics.port == 9464
    assert config.sharding.workers == 2 and config.sharding.handout == "auto" and config.sharding.store is None


def test_defaults_and_relative_paths(tmp_path):
    config = parse_config(MINIMAL, "x.toml", tmp_path)
    assert config.fleet.state_dir == tmp_path / "state" and config.model.bundle == tmp_path / "bundle"
    assert config.store_path == tmp_path / "state" / "aggregator.sqlite"
    assert config.privacy.mode == "distributed" and config.strategy.name == "fedavg"


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("rounds", "cohort_min", 1, "rounds.cohort_min"),
        ("rounds", "cohort_max", "100", "rounds.cohort_max"),
        ("rounds", "cohort_mn", 3, "rounds.cohort_mn"),
        ("rounds", "over_selection", -0.1, "rounds.over_selection"),
        ("rounds", "sampling", "self", "rounds.self_probability"),
        ("deadlines", "train", 0, "deadlines.train"),
        ("deadlines", "ready", float("nan"), "deadlines.ready"),
        ("privacy", "target_epsilon", 0, "privacy.target_epsilon"),
        ("privacy", "delta", 1.0, "privacy.delta"),
        ("privacy", "bits", 40, "privacy.bits"),
        ("privacy", "mode", "central", "privacy.mode"),
        ("privacy", "mechanism", "gaussian", "privacy.mechanism"),
        ("privacy", "threat_model", "none", "privacy.threat_model"),
        ("training", "epochs", 0, "training.epochs"),
        ("training", "lr", True, "training.lr"),
        ("metrics", "port", 70000, "metrics.port"),
        ("broker", "urls", ["http://x"], "broker.urls"),
        ("broker", "urls", [], "broker.urls"),
        ("broker", "protocol", "4", "broker.protocol"),
        ("fleet", "id", "a/b", "fleet.id"),
        ("strategy", "settings", 3, "strategy.settings"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_key(section, key, value, named):
    with pytest.raises(ServiceConfigError, match=named.replace(".", r"\.")):
        parse_config(with_value(section, key, value), "x.toml", Path())


def test_missing_sections_unknown_sections_and_tls_rules(tmp_path):
    with pytest.raises(ServiceConfigError, match=r"\[model\] section is required"):
        parse_config({k: v for k, v in MINIMAL.items() if k != "model"})
    with pytest.raises(ServiceConfigError, match=r"unknown section \[round\]"):
        parse_config({**MINIMAL, "round": {}})
    with pytest.raises(ServiceConfigError, match="fleet.state_dir is required"):
        parse_config({**MINIMAL, "fleet": {"id": "x"}})
    tls = {"urls": ["mqtt://localhost"], "tls": {"ca": "ca.pem"}}
    with pytest.raises(ServiceConfigError, match="must be mqtts://"):
        parse_config({**MINIMAL, "broker": tls})
    with pytest.raises(ServiceConfigError, match="both cert and key"):
        parse_config({**MINIMAL, "broker": {"urls": ["mqtts://h"], "tls": {"ca": "c", "cert": "x"}}})
    with pytest.raises(ServiceConfigError, match="rounds.cohort_max .* below"):
        parse_config({**MINIMAL, "rounds": {"cohort_min": 5, "cohort_max": 4}})


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ServiceConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet\nid=")
    with pytest.raises(ServiceConfigError, match="not valid TOML"):
        load_config(bad)
