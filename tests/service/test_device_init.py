"""``fleetlearn device init --state-dir``: identity key (0600, never replaced), id and ledger; the key to enrol."""

from __future__ import annotations

import re

from edge_sdk.cli import main
from edge_sdk.device.state_dir import load_state
from edge_sdk.privacy import DeviceLedger


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_init_makes_identity_id_and_ledger_and_prints_the_key(tmp_path, capsys):
    state = tmp_path / "state"
    code, out, _ = run(capsys, "device", "init", "--state-dir", str(state), "--device-id", "pi-7",
                       "--epsilon", "8", "--delta", "1e-5")
    assert code == 0
    printed = re.search(r"public key: ([0-9a-f]{64})", out).group(1)
    loaded = load_state(state)
    assert loaded.device_id == "pi-7" and loaded.identity.public.hex() == printed
    assert f"--device pi-7 --public-key {printed}" in out
    assert (state / "identity.key").stat().st_mode & 0o777 == 0o600
    assert DeviceLedger.snapshot(state / "privacy.ledger").spent().budget_epsilon == 8
    code, out, _ = run(capsys, "device", "budget", "--state-dir", str(state), "--json")
    assert code == 0 and '"budget_epsilon": 8.0' in out


def test_init_never_replaces_an_identity(tmp_path, capsys):
    state = tmp_path / "state"
    assert run(capsys, "device", "init", "--state-dir", str(state), "--profile", "pi4-2gb")[0] == 0
    key = (state / "identity.key").read_bytes()
    ledger = (state / "privacy.ledger").read_bytes()
    (state / "privacy.ledger").unlink()  # even with the ledger gone, the identity stays
    (state / "privacy.ledger.head").unlink()
    code, out, err = run(capsys, "device", "init", "--state-dir", str(state), "--profile", "pi4-2gb")
    assert code == 2 and "already initialised" in err and err.count("\n") == 1 and out == ""
    assert (state / "identity.key").read_bytes() == key and not (state / "privacy.ledger").exists()
    assert ledger


def test_the_ledger_only_form_still_works_and_bad_input_is_one_line(tmp_path, capsys):
    assert run(capsys, "device", "init", "--ledger", str(tmp_path / "l"), "--epsilon", "1", "--delta", "1e-5")[0] == 0
    for argv, message in [
        (["device", "init", "--epsilon", "1", "--delta", "1e-5"], "--state-dir DIR"),
        (["device", "init", "--ledger", str(tmp_path / "m"), "--device-id", "x", "--profile", "pi4-2gb"],
         "--device-id goes with --state-dir"),
        (["device", "init", "--state-dir", str(tmp_path / "s"), "--device-id", "a/b", "--profile", "pi4-2gb"],
         "device id"),
        (["device", "init", "--state-dir", str(tmp_path / "no" / "s"), "--profile", "pi4-2gb"], "does not exist"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
