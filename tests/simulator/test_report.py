"""report.json and the plots: round trip, atomic write, refusal to overwrite, damaged files, real PNGs."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from aggregator.simulator import report as report_module
from aggregator.simulator.records import RoundOutcome, SimulationReport, without_timings
from aggregator.simulator.report import (
    PLOT_NAMES,
    ReportError,
    load_report,
    make_run_dir,
    new_run_id,
    plot_report,
    report_from_json,
    write_report,
)
from aggregator.simulator.scenario import Scenario

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outcome(i: int, *, aborted: bool = False, seconds: float = 1.5) -> RoundOutcome:
    return RoundOutcome(
        round_index=i, status="aborted" if aborted else "completed",
        abort_reason="only 3 of t_honest 6 masked inputs arrived" if aborted else None,
        invited=10, participants=0 if aborted else 9, dropouts={"TRAIN": 1, "UNMASK": 0}, crashes={},
        accuracy=None if aborted else 0.5 + i / 40, loss=None if aborted else 1.0 / i, epsilon=0.25 * i,
        messages=120, bytes_up=40_000 * i, bytes_down=90_000, seconds=seconds, retransmissions=i % 2)


def sample_report(rounds: int = 6, *, run_id: str = "20261201-223000-s0", aborted: tuple[int, ...] = (3,),
                  seconds: float = 1.5, epsilon_target: bool = True) -> SimulationReport:
    config = Scenario(devices=10, rounds=max(rounds, 1)).to_json()
    if not epsilon_target:
        config.pop("epsilon")
    return SimulationReport(run_id=run_id, config=config, broker="embedded amqtt 0.12.1 (MQTT 3.1.1) on 127.0.0.1:1",
                            delta=1e-5, rounds=[outcome(i, aborted=i in aborted, seconds=seconds)
                                                for i in range(1, rounds + 1)],
                            timings={"total_seconds": 9.5, "peak_rss_mb": 120.0})


# -- report.json ---------------------------------------------------------------------------------------


def test_report_round_trips_with_sorted_keys_and_two_space_indent(tmp_path: Path) -> None:
    report = sample_report()
    path = write_report(report, tmp_path / "runs" / report.run_id)  # creates the missing directories
    assert path == tmp_path / "runs" / report.run_id / "report.json"
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(report.to_json(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    loaded = load_report(path)
    assert loaded == json.loads(json.dumps(report.to_json()))
    assert loaded["final_accuracy"] == report.final_accuracy and loaded["final_epsilon"] == 1.5
    assert loaded["config"]["seed"] == 0 and loaded["rounds"][2]["abort_reason"].startswith("only 3")
    assert report_from_json(loaded).to_json() == loaded  # the plots can be redrawn from a file
    assert load_report(path.parent) == loaded  # the run directory is accepted too
    assert sorted(os.listdir(path.parent)) == ["report.json"]  # no temporary file left behind


def test_load_report_checks_every_round_field() -> None:
    assert set(report_module._ROUND_FIELDS) == {f.name for f in fields(RoundOutcome)}


def test_rewriting_the_same_run_replaces_the_file_by_rename(tmp_path: Path) -> None:
    first = sample_report(rounds=2)
    path = write_report(first, tmp_path)
    with path.open(encoding="utf-8") as reader:  # a reader of the old report
        second = sample_report(rounds=4)
        assert write_report(second, tmp_path) == path
        assert json.loads(reader.read()) == json.loads(json.dumps(first.to_json()))  # still whole and old
    assert len(load_report(path)["rounds"]) == 4
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_refuses_to_overwrite_another_runs_report(tmp_path: Path) -> None:
    path = write_report(sample_report(run_id="20261201-223000-s0"), tmp_path)
    before = path.read_bytes()
    with pytest.raises(ReportError, match=r"report\.json already holds the report of run '20261201-223000-s0'") as e:
        write_report(sample_report(run_id="20261201-223000-s0-2"), tmp_path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


@pytest.mark.parametrize("content", [b"my notes\n", b'{"run_id": 7}', b""])
def test_refuses_to_overwrite_a_file_that_is_not_a_report(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "report.json").write_bytes(content)
    with pytest.raises(ReportError, match="not a fleetlearn report; not overwritten"):
        write_report(sample_report(), tmp_path)
    assert (tmp_path / "report.json").read_bytes() == content


@pytest.mark.parametrize("field_name", ["accuracy", "loss", "epsilon"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_names_the_round_and_writes_nothing(tmp_path: Path, field_name: str, bad: float) -> None:
    report = sample_report()
    report.rounds[3] = replace(report.rounds[3], **{field_name: bad})
    with pytest.raises(ReportError, match=rf"^round 4: {field_name}={bad!r}; the report holds finite numbers only"):
        write_report(report, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_non_finite_config_value_is_named(tmp_path: Path) -> None:
    report = sample_report()
    report.timings = {"peak_rss_mb": math.nan}
    with pytest.raises(ReportError, match=r"timings\.peak_rss_mb=nan"):
        write_report(report, tmp_path)
    assert not (tmp_path / "report.json").exists()


def _damaged(good: dict, change) -> bytes:
    data = json.loads(json.dumps(good))
    change(data)
    return json.dumps(data).encode()


def _set(path: tuple, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return change


GOOD = sample_report(rounds=3).to_json()
DAMAGED = {
    "truncated": (json.dumps(GOOD).encode()[:200], r"damaged or truncated: not JSON \(.* at line 1 column"),
    "not utf-8": (b'{"format": 1, "run_id": "\xff"}', r"damaged: not UTF-8 text \(byte 25\)"),
    "a list": (b"[1, 2]", r"not a simulation report: its top level is list"),
    "no format": (_damaged(GOOD, _set(("format",), KeyError)), r"no 'format' field"),
    "format 2": (_damaged(GOOD, _set(("format",), 2)), r"has report format 2; this fleetlearn reads format 1"),
    "no rounds": (_damaged(GOOD, _set(("rounds",), KeyError)), r"damaged: no 'rounds' field"),
    "rounds not a list": (_damaged(GOOD, _set(("rounds",), {})), r"'rounds' is dict, need a list"),
    "round missing field": (_damaged(GOOD, _set(("rounds", 1, "bytes_up"), KeyError)),
                            r"rounds\[1\] \(round 2\) has no 'bytes_up' field"),
    "round bad status": (_damaged(GOOD, _set(("rounds", 0, "status"), "done")),
                         r"rounds\[0\] \(round 1\) 'status' is 'done', need one of completed, aborted"),
    "round accuracy text": (_damaged(GOOD, _set(("rounds", 2, "accuracy"), "0.9")),
                            r"rounds\[2\] \(round 3\) 'accuracy' is '0.9', need a number or null"),
    "negative bytes": (_damaged(GOOD, _set(("rounds", 2, "bytes_down"), -1)), r"'bytes_down' is -1, need an integer"),
    "dropouts": (_damaged(GOOD, _set(("rounds", 0, "dropouts"), {"TRAIN": 1.5})), r"'dropouts' is \{'TRAIN': 1.5\}"),
    "NaN": (json.dumps(GOOD).replace('"final_epsilon": 0.75', '"final_epsilon": NaN').encode(),
            r"damaged: NaN is not a finite number"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_report_is_named_with_what_is_wrong(tmp_path: Path, case: str) -> None:
    content, message = DAMAGED[case]
    path = tmp_path / "report.json"
    path.write_bytes(content)
    with pytest.raises(ReportError, match=message) as e:
        load_report(path)
    assert str(path) in str(e.value)


def test_a_missing_report_is_named(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"report\.json: no such report"):
        load_report(tmp_path)


def test_without_timings_is_equal_for_runs_differing_only_in_timings(tmp_path: Path) -> None:
    a = sample_report(run_id="20261201-223000-s0", seconds=1.5)
    b = sample_report(run_id="20261201-223512-s0", seconds=7.25)
    b.timings = {"total_seconds": 40.0}
    b.rounds = [replace(r, retransmissions=r.retransmissions + 3) for r in b.rounds]
    b.config = dict(b.config) | {"broker": "mqtt://127.0.0.1:1883"}
    loaded_a = load_report(write_report(a, tmp_path / a.run_id))
    loaded_b = load_report(write_report(b, tmp_path / b.run_id))
    assert loaded_a != loaded_b
    assert without_timings(loaded_a) == without_timings(loaded_b)

    c = sample_report(run_id="20261201-224000-s0")
    c.rounds[4] = replace(c.rounds[4], accuracy=c.rounds[4].accuracy + 0.001)
    assert without_timings(load_report(write_report(c, tmp_path / c.run_id))) != without_timings(loaded_a)


# -- run ids -------------------------------------------------------------------------------------------


def test_run_ids_sort_by_time_and_take_a_suffix_when_taken(tmp_path: Path) -> None:
    now = datetime(2026, 12, 1, 22, 30, 0)
    assert new_run_id(now, 0) == "20261201-223000-s0"
    assert new_run_id(now, 7, taken={"20261201-223000-s7"}) == "20261201-223000-s7-2"
    assert new_run_id(now, 7, taken={"20261201-223000-s7", "20261201-223000-s7-2"}) == "20261201-223000-s7-3"
    later = [new_run_id(datetime(2026, 12, 1, 22, 30, 1), 0), new_run_id(datetime(2027, 1, 2, 3, 4, 5), 0)]
    assert sorted([later[1], "20261201-223000-s0", later[0]]) == ["20261201-223000-s0", *later]
    dirs = [make_run_dir(tmp_path / "runs", now, 3) for _ in range(3)]
    assert [d.name for d in dirs] == ["20261201-223000-s3", "20261201-223000-s3-2", "20261201-223000-s3-3"]
    assert all(d.is_dir() for d in dirs)
    assert new_run_id(now, 3, taken=tmp_path / "runs") == "20261201-223000-s3-4"
    with pytest.raises(ReportError, match="seed=-1"):
        new_run_id(now, -1)


# -- plots ---------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3]  # floats in [0, 1]


def _count_near(pixels: np.ndarray, rgb: tuple[float, float, float], tolerance: float = 0.03) -> int:
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) < tolerance).sum())


TAB_RED = (0xD6 / 255, 0x27 / 255, 0x28 / 255)
ABORT_SHADE = tuple(1 - 0.15 * (1 - c) for c in TAB_RED)  # tab:red at alpha 0.15 over white


@pytest.mark.slow
def test_plots_are_real_non_empty_pngs_of_the_expected_size(tmp_path: Path) -> None:
    paths = plot_report(sample_report(rounds=8), tmp_path / "run")
    assert paths == [tmp_path / "run" / name for name in PLOT_NAMES]
    for path in paths:
        assert _png_size(path) == (800, 450)
        pixels = _pixels(path)
        assert pixels.shape == (450, 800, 3)
        colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50, f"{path.name} looks blank"  # axes, text, lines, anti-aliasing
        assert (pixels < 0.5).mean() > 0.005, f"{path.name} has almost no ink"
    assert sorted(os.listdir(tmp_path / "run")) == sorted(PLOT_NAMES)  # no temporary files


def test_aborted_rounds_are_shaded_and_the_epsilon_target_drawn(tmp_path: Path) -> None:
    with_abort = plot_report(sample_report(aborted=(2, 5)), tmp_path / "a")
    without = plot_report(sample_report(aborted=(), epsilon_target=False), tmp_path / "b")
    assert _count_near(_pixels(with_abort[0]), ABORT_SHADE, 0.01) > 2000  # two round-wide bands
    assert _count_near(_pixels(without[0]), ABORT_SHADE, 0.01) == 0
    assert _count_near(_pixels(with_abort[1]), TAB_RED) > 300  # the dashed target line across the plot
    assert _count_near(_pixels(without[1]), TAB_RED) == 0


def test_a_report_without_rounds_still_plots(tmp_path: Path) -> None:
    for path in plot_report(sample_report(rounds=0, aborted=()), tmp_path):
        assert _png_size(path) == (800, 450)


def test_importing_the_report_module_does_not_import_matplotlib() -> None:
    code = "import sys, aggregator.simulator.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
