"""``fleetlearn simulate``'s bad arguments: one line naming the option, exit 2, no traceback, nothing written."""

from __future__ import annotations

import pytest

from edge_sdk.cli import main as cli_main


@pytest.mark.parametrize(("argv", "names"), [
    (["--devices", "1"], "--devices"),
    (["--rounds", "0"], "--rounds"),
    (["--dropout", "FOO=0.1"], "unknown stage 'FOO'"),
    (["--dropout", "1.5"], "--dropout"),
    (["--crash", "SHARE_KEYS=x"], "--crash"),
    (["--partition", "zipf"], "--partition"),
    (["--alpha", "-1"], "--alpha"),
    (["--bits", "40"], "bits=40"),
    (["--cohort", "50", "--devices", "10"], "cohort=50"),
    (["--shard", "2/2"], "--shard"),
    (["--shard", "1/2", "--broker", "mqtt://127.0.0.1:1883"], "--run-id"),
    (["--shard", "1/2"], "shared broker"),
    (["--broker", "http://localhost"], "mqtt:// or mqtts://"),
    (["--bundle", "/nonexistent/bundle"], "not a training bundle"),
    (["--dataset", "/nonexistent.npz"], "dataset="),
    (["--run-id", "../escape", "--bundle", "/nonexistent"], "bundle="),
    (["--stragglers", "2"], "--stragglers"),
    (["--epsilon", "nan"], "--epsilon"),
])
def test_a_bad_argument_is_one_line_and_exit_2(argv, names, capsys, tmp_path):
    code = cli_main(["simulate", "--out", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fleetlearn simulate: error: "), err
    assert names in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_bad_run_id_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch):
    from aggregator.simulator.fleet_setup import check_run_id
    from aggregator.simulator.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="run id"):
        check_run_id("../escape")
