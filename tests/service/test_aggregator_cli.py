"""``fleetlearn aggregator enrol/revoke/devices``: bad input is one line, exit 2, and the store is unchanged."""

from __future__ import annotations

import json

import pytest

from aggregator.store import open_store
from edge_sdk.cli import main
from edge_sdk.secagg.keys import IdentityKey


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_enrol_list_revoke(tmp_path, capsys):
    store = str(tmp_path / "a.sqlite")
    key_a, key_b = IdentityKey.generate().public.hex(), IdentityKey.generate().public.hex()
    assert run(capsys, "aggregator", "enrol", "--store", store, "--device", "pi-a", "--public-key", key_a)[0] == 0
    assert run(capsys, "aggregator", "enrol", "--store", store, "--device", "pi-b", "--public-key", key_b)[0] == 0
    code, out, _ = run(capsys, "aggregator", "revoke", "--store", store, "--device", "pi-a", "--reason", "lost")
    assert code == 0 and "revoked device pi-a" in out
    code, out, _ = run(capsys, "aggregator", "devices", "--store", store, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["device"], r["public_key"], r["revoke_reason"]) for r in rows] == [
        ("pi-a", key_a, "lost"), ("pi-b", key_b, None)]
    code, out, _ = run(capsys, "aggregator", "devices", "--store", store, "--active")
    assert out.startswith("pi-b\t" + key_b) and out.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["enrol", "--device", "pi-a", "--public-key", "zz"], "hex digits"),
        (["enrol", "--device", "pi-a", "--public-key", "ab" * 31], "32 bytes"),
        (["enrol", "--device", "pi/x", "--public-key", "ab" * 32], "device id"),
        (["enrol", "--device", "pi-a", "--public-key", "cd" * 32], "already enrolled"),
        (["enrol", "--device", "pi-new", "--public-key", "KEY_A"], "already enrolled as device pi-a"),
        (["revoke", "--device", "pi-z"], "not enrolled"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capsys, argv, message):
    store = str(tmp_path / "a.sqlite")
    key_a = IdentityKey.generate().public.hex()
    assert run(capsys, "aggregator", "enrol", "--store", store, "--device", "pi-a", "--public-key", key_a)[0] == 0
    argv = [key_a if a == "KEY_A" else a for a in argv]
    code, out, err = run(capsys, "aggregator", argv[0], "--store", store, *argv[1:])
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    with open_store(store) as opened:
        assert [(d.device_id, d.public_key.hex(), d.active) for d in opened.devices()] == [("pi-a", key_a, True)]


def test_reading_commands_need_an_existing_store(tmp_path, capsys):
    code, _, err = run(capsys, "aggregator", "devices", "--store", str(tmp_path / "none.sqlite"))
    assert code == 2 and "no store there" in err
    assert not (tmp_path / "none.sqlite").exists()
