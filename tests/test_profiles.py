"""Device profiles (TOML): every shipped one loads, every mistake is one line naming key and allowed values,
and the CLI takes its defaults and limits from them.

The CLI cases run the real ``fleetlearn`` entry point on a compiled bundle and real .npz data.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from aggregator import model_zoo
from aggregator.compiler import compile_model
from edge_sdk.cli import build_parser, main
from edge_sdk.commands.device import agent_settings
from edge_sdk.config import PROFILES_DIR, ProfileError, bundled_profiles, load_profile
from edge_sdk.device.eligibility import DevicePolicy
from edge_sdk.training.bundle import MANIFEST_FILE, Manifest
from edge_sdk.training.working_set import RUNTIME_MB, estimate, largest_batch_within

SHIPPED = ["generic-x86", "jetson-orin-nano", "pi-3b-plus", "pi-4", "pi-5", "pi-zero-2w"]
# Cores and RAM from the boards' data sheets: a profile may not claim more than its board has.
BOARDS = {"pi-zero-2w": (4, 512), "pi-3b-plus": (4, 1024), "pi-4": (4, 2048), "pi-5": (4, 4096),
          "jetson-orin-nano": (6, 8192), "generic-x86": (4, 4096)}

VALID = """
[board]
name = "custom"
cores = 4
memory_mb = 2048

[runtime]
threads = 2
memory_budget_mb = 512

[training]
default_batch_size = 32
max_batch_size = 128
"""


def write(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the shipped profiles --------------------------------------------------------------------------


def test_the_six_boards_are_shipped_as_toml():
    assert bundled_profiles() == SHIPPED
    assert not list(PROFILES_DIR.glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_within_its_board(name):
    profile = load_profile(name)
    cores, memory = BOARDS[name]
    assert profile.name == name and (profile.board.cores, profile.board.memory_mb) == (cores, memory)
    assert 1 <= profile.threads <= cores
    assert profile.runtime.memory_budget_mb <= memory // 2  # at least half the RAM stays with the OS
    assert profile.batch_size <= profile.training.max_batch_size
    assert 5 <= profile.mqtt.keepalive_s <= 300 and profile.tls.ca is None  # TLS paths are per-deployment
    assert isinstance(profile.eligibility.policy(), DevicePolicy) and profile.epsilon_budget > 0


def test_the_old_names_still_load_as_their_board():
    assert load_profile("pi4-2gb") == load_profile("pi-4")
    assert load_profile("pi5-8gb").threads == 4


def test_an_unknown_name_lists_the_shipped_profiles():
    with pytest.raises(ProfileError, match="bundled profiles: generic-x86, jetson-orin-nano, pi-3b-plus"):
        load_profile("pi-99")


# -- invalid profiles: one clear error each ----------------------------------------------------------


def edit(section: str, line: str) -> str:
    """VALID with ``line`` appended to ``[section]`` (replacing the key if it is there)."""
    key = line.split("=")[0].strip()
    out, current = [], None
    for text in VALID.strip().splitlines():
        if text.startswith("["):
            if current == section:
                out.append(line)
                line = ""
            current = text.strip("[]")
        if not (current == section and text.split("=")[0].strip() == key):
            out.append(text)
    if line and current == section:
        out.append(line)
    elif line:
        out += [f"[{section}]", line]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("runtime", "thread = 2", "[runtime] thread = 2: unknown key; allowed keys in [runtime]: memory_budget_mb, "
         "threads"),
        ("runtime", "threads = 9", "[runtime] threads = 9: allowed 1..4 (cores of this board)"),
        ("runtime", "threads = 0", "[runtime] threads = 0: allowed 1..4 (cores of this board)"),
        ("runtime", 'threads = "2"', "[runtime] threads = '2': allowed 1..4"),
        ("runtime", "threads = 2.0", "[runtime] threads = 2.0: allowed 1..4"),
        ("runtime", "memory_budget_mb = 4096", "[runtime] memory_budget_mb = 4096: allowed 32..2048 (up to the "
         "board's memory_mb)"),
        ("training", "default_batch_size = 256", "[training] default_batch_size = 256: allowed 1..128 (up to "
         "max_batch_size)"),
        ("training", "max_batch_size = true", "[training] max_batch_size = true: allowed 1..65536"),
        ("board", "cores = -1", "[board] cores = -1: allowed 1..256"),
        ("board", 'name = "Pi 4"', "[board] name = 'Pi 4': allowed a lower-case name"),
        ("mqtt", "keepalive_s = 2", "[mqtt] keepalive_s = 2: allowed 5..65535 (seconds)"),
        ("mqtt", "keepalive_s = 70000", "[mqtt] keepalive_s = 70000: allowed 5..65535"),
        ("privacy", "delta = 1.0", "[privacy] delta = 1.0: allowed a number (0, 1)"),
        ("privacy", "epsilon_budget = 0", "[privacy] epsilon_budget = 0: allowed a number (0, 1e+06]"),
        ("tls", "ca = 5", "[tls] ca = 5: allowed a file path (a non-empty string)"),
        ("tls", 'ca = ""', "[tls] ca = '': allowed a file path"),
        ("tls", 'cert = "device.pem"', "[tls] cert is given alone: allowed cert and key together (mTLS) or neither"),
        ("eligibility", "min_battery = 120", "[eligibility] min_battery = 120: allowed a number [0, 100] or 'off'"),
        ("eligibility", 'max_cpu_celsius = "none"', "[eligibility] max_cpu_celsius = 'none': allowed a number "
         "[0, 125] or 'off'"),
        ("eligibility", 'require_charging = "yes"', "[eligibility] require_charging = 'yes': allowed true or false"),
        ("eligibility", "max_load_per_cpu = nan", "[eligibility] max_load_per_cpu = nan: allowed a number [0, 64]"),
        ("gpu", "cuda = true", "[gpu]: unknown section; allowed sections: [board], [runtime], [training], "
         "[privacy], [mqtt], [tls], [eligibility]"),
    ],
)
def test_each_invalid_value_is_one_error_naming_file_key_and_allowed_values(tmp_path, section, line, message):
    path = write(tmp_path, edit(section, line))
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    text = str(caught.value)
    assert text.startswith(f"profile {path}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (VALID.replace("threads = 2\n", ""), "[runtime] threads is missing: allowed 1..4"),
        (VALID.split("[training]")[0], "section [training] is missing: it needs default_batch_size, max_batch_size"),
        ("threads = 2\n" + VALID, "threads = 2: keys belong in a section; allowed sections: [board], "
         "[runtime], [training], [privacy], [mqtt], [tls], [eligibility]; threads belongs in [runtime]"),
        ('runtime = "fast"\n' + VALID.replace("[runtime]\n", "[run]\n"), "runtime = 'fast': keys belong in a "
         "section; write [runtime]"),
        (VALID + "[runtime.extra]\n", "[runtime] extra = {}: unknown key"),
        ("[board\n", "not valid TOML"),
    ],
)
def test_structural_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile(write(tmp_path, text))


def test_the_error_for_a_shipped_profile_names_the_shipped_file(tmp_path):
    # The example of the task: a bundled profile is named by its file name, not a long package path.
    data = tomllib.loads((PROFILES_DIR / "pi-4.toml").read_text())
    from edge_sdk.config import parse_profile

    data["runtime"]["threads"] = 9
    with pytest.raises(ProfileError, match=re.escape("profile pi-4.toml: [runtime] threads = 9: allowed 1..4 "
                                                     "(cores of this board)")):
        parse_profile(data, "profile pi-4.toml")


def test_off_switches_a_rule_off_and_tls_paths_are_relative_to_the_file(tmp_path):
    text = VALID + ('[eligibility]\nmin_battery = "off"\nmax_cpu_celsius = 60\nrequire_charging = true\n'
                    '[tls]\nca = "certs/ca.pem"\ncert = "/etc/fleetlearn/device.pem"\n'
                    'key = "/etc/fleetlearn/device.key"\n'
                    '[mqtt]\nkeepalive_s = 30\n')
    profile = load_profile(write(tmp_path, text))
    assert profile.eligibility.policy() == DevicePolicy(require_charging=True, min_battery_percent=None,
                                                        max_cpu_celsius=60.0, max_load_per_cpu=1.0)
    assert profile.tls.ca == tmp_path.resolve() / "certs" / "ca.pem"
    assert profile.tls.cert == Path("/etc/fleetlearn/device.pem") and profile.mqtt.keepalive_s == 30


# -- the CLI takes defaults and limits from the profile -----------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profiles_cli")
    compile_model(model_zoo.mlp((64, 16, 10), seed=0), root / "bundle", loss="cross_entropy", optimizer="adam")
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", x=rng.random((64, 64), dtype=np.float32), y=rng.integers(0, 10, 64))
    return root


TRAIN = ["train", "{root}/bundle", "--data", "{root}/train.npz", "--epochs", "1", "--lr", "0.01", "--out",
         "{root}/out.npz"]


def train(capsys, root: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, *[a.format(root=root) for a in TRAIN], *extra)


@pytest.mark.parametrize(("name", "steps"), [("pi-zero-2w", 4), ("pi-4", 2), ("pi-5", 1), ("jetson-orin-nano", 1)])
def test_train_takes_the_batch_size_from_the_profile(workdir, capsys, name, steps):
    code, out, err = train(capsys, workdir, "--profile", name)
    assert code == 0, err
    assert f"steps {steps} " in out  # 64 examples at the profile's default_batch_size


def test_a_batch_size_above_the_profile_limit_is_refused_by_name(workdir, capsys):
    (workdir / "out.npz").unlink(missing_ok=True)
    code, out, err = train(capsys, workdir, "--profile", "pi-zero-2w", "--batch-size", "65")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--batch-size 65 is above profile pi-zero-2w's [training] max_batch_size 64" in err
    assert not (workdir / "out.npz").exists()
    assert train(capsys, workdir, "--profile", "pi-zero-2w", "--batch-size", "64")[0] == 0
    assert train(capsys, workdir, "--batch-size", "65")[0] == 0  # without a profile there is no board limit


def test_a_bundle_beyond_the_memory_budget_is_refused_with_the_batch_that_fits(workdir, capsys, tmp_path):
    manifest = Manifest.from_dict(json.loads((workdir / "bundle" / MANIFEST_FILE).read_text()))
    fits = largest_batch_within(manifest, RUNTIME_MB + 1, 65536)
    assert estimate(manifest, fits).total <= (RUNTIME_MB + 1) << 20 < estimate(manifest, fits + 1).total
    profile = write(tmp_path, VALID.replace("memory_budget_mb = 512", f"memory_budget_mb = {RUNTIME_MB + 1}")
                    .replace("max_batch_size = 128", "max_batch_size = 65536"))
    code, _, err = train(capsys, workdir, "--profile", str(profile), "--batch-size", str(fits + 1))
    assert code == 2 and err.count("\n") == 1, err
    assert f"at batch size {fits + 1} needs at least" in err and f"memory_budget_mb {RUNTIME_MB + 1}" in err
    assert f"the largest batch size that fits is {fits}" in err
    assert train(capsys, workdir, "--profile", str(profile), "--batch-size", str(fits))[0] == 0
    tiny = write(tmp_path, VALID.replace("memory_budget_mb = 512", "memory_budget_mb = 32"), "tiny.toml")
    code, _, err = train(capsys, workdir, "--profile", str(tiny))
    assert code == 2 and "does not fit at any batch size" in err


def device_run_args(root: Path, *extra: str):
    return build_parser("device").parse_args(["device", "run", "--state-dir", str(root), "--bundle",
                                              str(root / "bundle"), "--broker", "mqtts://broker.example:8883",
                                              *extra])


def test_device_run_takes_keepalive_tls_eligibility_and_batch_limit_from_the_profile(workdir, tmp_path):
    (tmp_path / "ca.pem").write_text("a CA\n")
    profile = write(tmp_path, VALID + '[mqtt]\nkeepalive_s = 90\n[tls]\nca = "ca.pem"\n'
                    '[eligibility]\nmax_cpu_celsius = 65\nmin_battery = "off"\n')
    settings = agent_settings(device_run_args(workdir, "--profile", str(profile)))
    assert settings.keepalive_s == 90 and settings.ca_file == str(tmp_path.resolve() / "ca.pem")
    assert settings.threads == 2 and settings.max_batch_size == 128
    assert settings.policy == DevicePolicy(min_battery_percent=None, max_cpu_celsius=65.0, max_load_per_cpu=1.0)
    overridden = agent_settings(device_run_args(workdir, "--profile", str(profile), "--tls-ca", "/other/ca.pem",
                                                "--max-cpu-celsius", "off", "--min-battery", "40",
                                                "--require-charging"))
    assert overridden.ca_file == "/other/ca.pem"
    assert overridden.policy == DevicePolicy(require_charging=True, min_battery_percent=40.0, max_cpu_celsius=None,
                                             max_load_per_cpu=1.0)
    shipped = agent_settings(device_run_args(workdir, "--profile", "pi-zero-2w"))
    assert shipped.keepalive_s == 120 and shipped.ca_file is None and shipped.max_batch_size == 64
    assert shipped.policy.max_load_per_cpu == 0.5 and shipped.policy.min_battery_percent == 30.0


def test_device_run_names_a_missing_tls_file_and_a_model_too_big_for_the_board(workdir, tmp_path, capsys):
    profile = write(tmp_path, VALID + '[tls]\nca = "missing-ca.pem"\n')
    argv = ["device", "run", "--state-dir", str(workdir), "--bundle", str(workdir / "bundle"), "--broker",
            "mqtts://broker.example:8883", "--profile"]
    code, _, err = run(capsys, *argv, str(profile))
    assert code == 2 and err.count("\n") == 1
    assert f"[tls] ca = '{tmp_path.resolve() / 'missing-ca.pem'}': no such file (or give --tls-ca)" in err
    tiny = write(tmp_path, VALID.replace("memory_budget_mb = 512", "memory_budget_mb = 32"), "tiny.toml")
    code, _, err = run(capsys, *argv, str(tiny))
    assert code == 2 and err.count("\n") == 1 and "at batch size 1, above profile custom's [runtime] " \
        "memory_budget_mb 32" in err and "does not fit this board" in err


def test_device_init_takes_the_budget_from_the_profile(tmp_path, capsys):
    code, out, err = run(capsys, "device", "init", "--ledger", str(tmp_path / "ledger"), "--profile", "pi-5")
    assert code == 0, err
    assert "budget epsilon=8 delta=1e-06" in out
