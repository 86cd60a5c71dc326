"""What simulate shows: plain lines off a terminal, rich's live bar on one, the terminal restored after errors."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.simulator.progress import (
    ROUND_STAGES,
    LiveProgress,
    PlainProgress,
    Progress,
    make_progress,
    round_line,
)
from aggregator.simulator.records import RoundOutcome, SimulationReport
from aggregator.simulator.scenario import Scenario

SHOW_CURSOR = "\x1b[?25h"
HIDE_CURSOR = "\x1b[?25l"


def outcome(i: int, *, aborted: bool = False) -> RoundOutcome:
    return RoundOutcome(
        round_index=i, status="aborted" if aborted else "completed",
        abort_reason="only 40 of t_honest 60 masked inputs arrived" if aborted else None,
        invited=100, participants=0 if aborted else 95, dropouts={"TRAIN": 2, "SHARE_KEYS": 0, "UNMASK": 3},
        crashes={"MASKED_INPUT": 1} if i == 2 else {}, accuracy=None if aborted else 0.8 + i / 100,
        loss=None if aborted else 0.5, epsilon=0.125 * i, messages=500, bytes_up=1_234_000 * i,
        bytes_down=3_400_000, seconds=4.1)


def report(rounds: list[RoundOutcome]) -> SimulationReport:
    return SimulationReport(run_id="20261201-223000-s0", config=Scenario(devices=100, rounds=len(rounds)).to_json(),
                            broker="embedded amqtt 0.12.1 (MQTT 3.1.1) on 127.0.0.1:41234", delta=1e-5, rounds=rounds)


def drive(progress: Progress, rounds: list[RoundOutcome], paths: list[Path]) -> None:
    progress.start(len(rounds), "100 devices, digits, seed 0")
    for o in rounds:
        for stage in ROUND_STAGES[:-1]:
            progress.stage(o.round_index, stage)
        progress.stage(o.round_index, "ABORTED" if o.status == "aborted" else "PUBLISH")
        progress.round_done(o)
    progress.finish(report(rounds), paths)


ROUNDS = [outcome(1), outcome(2), outcome(3, aborted=True), outcome(4)]
PATHS = [Path("runs/20261201-223000-s0/report.json"), Path("runs/20261201-223000-s0/accuracy.png")]


# -- the line ------------------------------------------------------------------------------------------


def test_round_line_holds_every_field_in_grep_friendly_form() -> None:
    line = round_line(outcome(3), 1e-5, total=20)
    assert line == ("round  3/20  completed  acc 0.830  loss  0.500   95/100 summed  up   3.7 MB  down   3.4 MB  "
                    "ε   0.38 (δ 1e-05)    4.1 s  dropped TRAIN 2, UNMASK 3")
    assert round_line(outcome(2), 1e-5).endswith("dropped TRAIN 2, UNMASK 3  crashed MASKED_INPUT 1")
    assert "(δ" not in round_line(outcome(2), None)  # an unknown δ is left out, not guessed


def test_an_aborted_round_says_why() -> None:
    line = round_line(outcome(3, aborted=True), 1e-5, total=20)
    assert re.match(r"round  3/20  aborted    acc     -  loss      -    0/100 summed", line)
    assert line.endswith("aborted: only 40 of t_honest 60 masked inputs arrived")


def test_round_lines_are_aligned() -> None:
    lines = [round_line(outcome(i, aborted=i == 7), 1e-5, total=12) for i in (1, 7, 12)]
    for field in ("acc ", "loss ", "summed", "up ", "down ", "ε ", " s  dropped"):
        assert len({line.index(field) for line in lines}) == 1, field


# -- plain ---------------------------------------------------------------------------------------------


def test_plain_output_off_a_terminal_is_one_line_per_round() -> None:
    stream = io.StringIO()
    progress = make_progress(stream, delta=1e-5)
    assert isinstance(progress, PlainProgress)
    with progress:
        drive(progress, ROUNDS, PATHS)
    out = stream.getvalue()
    assert "\x1b" not in out  # no escape codes in a log file
    lines = out.splitlines()
    round_lines = [line for line in lines if line.startswith("round ")]
    assert round_lines == [round_line(o, 1e-5, total=4) for o in ROUNDS]
    assert lines[0] == "simulating 100 devices, digits, seed 0: 4 rounds"
    assert lines[1:5] == round_lines  # nothing per stage
    assert lines[5:] == [
        "finished 4 rounds: 3 completed, 1 aborted, 16.4 s",
        "final accuracy 0.840  final ε 0.50 at δ 1e-05 (target 3)",
        "broker embedded amqtt 0.12.1 (MQTT 3.1.1) on 127.0.0.1:41234",
        "wrote runs/20261201-223000-s0/report.json",
        "wrote runs/20261201-223000-s0/accuracy.png",
    ]
    for field in ("acc ", "loss ", "95/100 summed", "up ", "down ", "ε ", "(δ 1e-05)", "dropped TRAIN 2"):
        assert all(field in line for line in round_lines if "aborted" not in line), field


def test_no_stream_shows_nothing_and_plain_true_wins_over_a_terminal() -> None:
    silent = make_progress(None)
    drive(silent, ROUNDS, PATHS)  # nowhere to write: it must not fall back to sys.stdout
    assert type(silent) is Progress
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert isinstance(make_progress(terminal, plain=True), PlainProgress)
    os.close(master)


def test_a_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        assert isinstance(make_progress(terminal), PlainProgress)
    os.close(master)


def test_the_plain_display_does_not_import_rich() -> None:
    code = ("import io, sys; from aggregator.simulator.progress import make_progress; "
            "p = make_progress(io.StringIO()); p.start(1, 't'); p.close(); print('rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def strip_escapes(text: str) -> str:
    """The text without colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


# -- live ----------------------------------------------------------------------------------------------


class Terminal:
    """A real pseudo-terminal, 140 columns wide, whose output a thread collects."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        self.stream = os.fdopen(slave, "w", encoding="utf-8")
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the slave side is closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def output(self) -> str:
        self.stream.close()
        self.reader.join(timeout=30)
        os.close(self.master)
        return b"".join(self.chunks).decode("utf-8", errors="replace")


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    yield term
    if not term.stream.closed:
        term.output()


def test_on_a_terminal_the_live_display_shows_the_bar_stages_and_round_lines(terminal: Terminal) -> None:
    stdout = sys.stdout
    progress = make_progress(terminal.stream, delta=1e-5)
    assert isinstance(progress, LiveProgress)
    with progress:
        drive(progress, ROUNDS, PATHS)
        assert sys.stdout is stdout  # a display on another stream leaves the process's stdout alone
    out = terminal.output()
    plain = strip_escapes(out)
    assert HIDE_CURSOR in out and out.rstrip().count(SHOW_CURSOR) >= 1
    assert "━" in plain and "4/4 rounds" in plain  # the bar, finished
    assert "100 devices, digits, seed 0" in plain
    for o in ROUNDS:
        assert round_line(o, 1e-5, total=4) in plain.replace("\r", "")
    assert "UNMASK›PUBLISH" in plain or "UNMASK›ABORTED" in plain  # the stage line
    assert "wrote runs/20261201-223000-s0/report.json" in plain
    summary = plain.index("finished 4 rounds")
    assert summary > plain.rindex("━")  # the summary comes after the display stopped


def test_forced_live_display_on_a_string_stream() -> None:
    stream = io.StringIO()
    progress = make_progress(stream, plain=False, delta=1e-5)
    assert isinstance(progress, LiveProgress)
    with progress:
        drive(progress, ROUNDS[:2], PATHS)
    out = stream.getvalue()
    assert "━" in out and "2/2" in out and SHOW_CURSOR in out
    assert "completed" in out and "final accuracy 0.820" in out


def test_close_after_an_exception_restores_the_terminal(terminal: Terminal) -> None:
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="engine failed"), make_progress(terminal.stream) as progress:
        progress.start(10, "doomed")
        progress.stage(1, "SHARE_KEYS")
        progress.round_done(outcome(1))
        raise RuntimeError("engine failed")
    assert not progress.live.is_started
    progress.close()  # idempotent
    progress.close()
    assert sys.stdout is stdout and sys.stderr is stderr
    out = terminal.output()
    assert out.rindex(SHOW_CURSOR) > out.rindex(HIDE_CURSOR)  # the cursor is back
    assert "round  1/10  completed" in strip_escapes(out)


def test_the_live_display_on_the_process_stdout_prints_stray_output_above_itself(tmp_path: Path) -> None:
    # A child process whose stdout is a pseudo-terminal: print() during the display goes through rich,
    # and the redirect is undone by close().
    code = ("import sys; from aggregator.simulator.progress import make_progress, LiveProgress\n"
            "p = make_progress(sys.stdout); assert isinstance(p, LiveProgress)\n"
            "with p:\n    p.start(2, 'child')\n    print('stray line')\n"
            "    redirected = sys.stdout is not sys.__stdout__\n"
            "print('redirected', redirected, 'restored', sys.stdout is sys.__stdout__)\n")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[2])
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    child.stderr.close()
    out = b"".join(chunks).decode("utf-8", errors="replace")
    assert "stray line" in out and "redirected True restored True" in out
