"""What ``fleetlearn simulate`` shows while it runs: a live bar on a terminal, one line per round otherwise.

Why two displays behind one interface: a person at a terminal wants to see the round's stage move;
a log file, a pipe or CI wants exactly one grep-able line per round and no escape codes. Both
write only to the stream they are given (the CLI's stdout), never to ``sys.stdout`` behind the
caller's back, and both print the same ``round_line``. ``rich`` is imported only for the live
display, so the plain one works without the ``sim`` extra.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .records import RoundOutcome, SimulationReport
from .scenario import FAULT_STAGES

# What the live display walks through each round: the fault stages, then how the round ended.
ROUND_STAGES = (*FAULT_STAGES, "PUBLISH")
ABORTED = "ABORTED"


def _bytes(n: int) -> str:
    for factor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _number(value: float | None, width: int, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def _per_stage(counts: Mapping[str, int]) -> str:
    others = sorted(s for s in counts if s not in FAULT_STAGES)
    order = [s for s in (*FAULT_STAGES, *others) if counts.get(s)]
    return ", ".join(f"{s} {counts[s]}" for s in order) or "none"


def round_line(outcome: RoundOutcome, delta: float | None, *, total: int | None = None) -> str:
    """One round as one line; fixed-width fields first, the variable ones (drops, why aborted) last.

    e.g. ``round  3/20  completed  acc 0.842  loss 0.512  95/100 summed  up 1.2 MB  down 3.4 MB
    ε 1.27 (δ 1e-05)  4.1 s  dropped TRAIN 2, UNMASK 3``. Every field is ``name value`` so
    ``grep``/``awk`` can pick it out; an aborted round ends with ``aborted: <reason>``. With
    ``delta=None`` (not known) the δ is left out rather than guessed.
    """
    width = len(str(total)) if total else 3
    index = f"{outcome.round_index:>{width}}" + (f"/{total}" if total else "")
    n = len(str(max(outcome.invited, 1)))
    parts = [
        f"round {index}",
        f"{outcome.status:<9}",
        f"acc {_number(outcome.accuracy, 5)}",
        f"loss {_number(outcome.loss, 6)}",
        f"{outcome.participants:>{n}}/{outcome.invited} summed",
        f"up {_bytes(outcome.bytes_up):>8}",
        f"down {_bytes(outcome.bytes_down):>8}",
        f"ε {_number(outcome.epsilon, 6, 2)}" + ("" if delta is None else f" (δ {delta:.0e})"),
        f"{outcome.seconds:5.1f} s",
        f"dropped {_per_stage(outcome.dropouts)}",
    ]
    if any(outcome.crashes.values()):
        parts.append(f"crashed {_per_stage(outcome.crashes)}")
    if outcome.status != "completed":
        parts.append(f"aborted: {outcome.abort_reason or 'no reason given'}")
    return "  ".join(parts)


def summary_lines(report: SimulationReport, paths: Sequence[Path]) -> list[str]:
    """The closing lines: rounds, final accuracy and ε at δ, the broker, and where the files are."""
    rounds = report.rounds
    completed = sum(r.status == "completed" for r in rounds)
    seconds = sum(r.seconds for r in rounds)
    accuracy = report.final_accuracy
    target = report.config.get("epsilon")
    target_text = f" (target {target:g})" if isinstance(target, (int, float)) else ""
    lines = [
        f"finished {len(rounds)} rounds: {completed} completed, {len(rounds) - completed} aborted, {seconds:.1f} s",
        f"final accuracy {'-' if accuracy is None else f'{accuracy:.3f}'}  "
        f"final ε {report.final_epsilon:.2f} at δ {report.delta:.0e}{target_text}",
        f"broker {report.broker}",
    ]
    lines += [f"wrote {path}" for path in paths]
    return lines


class Progress:
    """The interface the simulator drives; this base class shows nothing (no stream given)."""

    def start(self, total_rounds: int, title: str) -> None:
        self.total = total_rounds

    def stage(self, round_index: int, stage: str) -> None:
        """The round has entered ``stage`` (one of ``ROUND_STAGES`` or ``ABORTED``)."""

    def round_done(self, outcome: RoundOutcome) -> None:
        """The round has ended; print its line."""

    def finish(self, report: SimulationReport, paths: Sequence[Path]) -> None:
        """The run has ended and ``paths`` (report.json, the plots) are written; print the summary."""

    def close(self) -> None:
        """Stop any live display and give the terminal back; safe to call twice and after an exception."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainProgress(Progress):
    """One line when the run starts, one per round, then the summary; flushed at once (for ``tail -f``)."""

    def __init__(self, stream: IO[str], delta: float | None = None) -> None:
        self.stream = stream
        self.total: int | None = None
        self.delta = delta
        self.closed = False

    def _write(self, line: str) -> None:
        if self.closed:
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, total_rounds: int, title: str) -> None:
        self.total = total_rounds
        self._write(f"simulating {title}: {total_rounds} rounds")

    def round_done(self, outcome: RoundOutcome) -> None:
        self._write(round_line(outcome, self.delta, total=self.total))

    def finish(self, report: SimulationReport, paths: Sequence[Path]) -> None:
        for line in summary_lines(report, paths):
            self._write(line)

    def close(self) -> None:
        self.closed = True


class _StageLine:
    """The live line under the bar: the current round's stages, done ones dim, the current one bold."""

    def __init__(self) -> None:
        self.round_index: int | None = None
        self.reached = -1  # index in ROUND_STAGES of the last stage entered
        self.aborted = False
        self.since = time.monotonic()

    def enter(self, round_index: int, stage: str) -> None:
        if round_index != self.round_index:
            self.round_index, self.reached, self.aborted = round_index, -1, False
            self.since = time.monotonic()
        if stage == ABORTED:
            self.aborted = True
        elif stage in ROUND_STAGES:
            self.reached = ROUND_STAGES.index(stage)

    def __rich__(self) -> Any:
        from rich.text import Text

        if self.round_index is None:
            return Text("starting", style="dim")
        text = Text(f"round {self.round_index}  ")
        for i, name in enumerate(ROUND_STAGES):
            if name == "PUBLISH" and self.aborted:
                text.append(ABORTED, style="bold red")
            elif i > self.reached:
                text.append(name, style="dim")
            elif i == self.reached and not self.aborted:
                text.append(name, style="bold cyan")
            else:
                text.append(name, style="green" if not self.aborted or i < self.reached else "red")
            if i < len(ROUND_STAGES) - 1:
                text.append("›", style="dim")
        text.append(f"  {time.monotonic() - self.since:.1f} s", style="dim")
        text.no_wrap, text.overflow = True, "ellipsis"  # one line even on a narrow terminal
        return text


class LiveProgress(Progress):
    """rich's live display: a bar for the rounds, the stage line, finished rounds' lines printed above."""

    def __init__(self, stream: IO[str], *, force_terminal: bool = False, delta: float | None = None) -> None:
        import sys

        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.console = Console(file=stream, force_terminal=force_terminal or None, highlight=False)
        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.line = _StageLine()
        # Redirect print()s and stray writes above the display only when it is drawn on the process's own
        # stdout; a display on another stream must not take over the process's stdout.
        own = stream is sys.stdout or stream is sys.__stdout__
        self.live = Live(Group(self.bar, self.line), console=self.console, refresh_per_second=8,
                         redirect_stdout=own, redirect_stderr=own)
        self.task: Any = None
        self.total: int | None = None
        self.delta = delta
        self.closed = False

    def start(self, total_rounds: int, title: str) -> None:
        self.total = total_rounds
        self.task = self.bar.add_task(title, total=total_rounds)
        self.live.start()

    def stage(self, round_index: int, stage: str) -> None:
        self.line.enter(round_index, stage)

    def round_done(self, outcome: RoundOutcome) -> None:
        from rich.text import Text

        text = Text(round_line(outcome, self.delta, total=self.total))
        status = text.plain.find(outcome.status)
        text.stylize("green" if outcome.status == "completed" else "bold red", status, status + len(outcome.status))
        self.console.print(text, soft_wrap=True)  # one physical line, so the scrollback stays grep-able
        if self.task is not None:
            self.bar.advance(self.task)

    def finish(self, report: SimulationReport, paths: Sequence[Path]) -> None:
        self.close()
        for line in summary_lines(report, paths):
            self.console.print(line, soft_wrap=True, markup=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.live.stop()  # idempotent in rich too; shows the cursor and undoes the redirects


def make_progress(stream: IO[str] | None = None, *, plain: bool | None = None,
                  delta: float | None = None) -> Progress:
    """The display for ``stream``: live on a terminal (unless ``plain``), plain lines otherwise.

    ``stream=None`` shows nothing (the Python API's default); the CLI passes ``sys.stdout``.
    ``plain=False`` forces the live display even on a non-terminal (tests, ``script``).
    ``delta`` is the δ each round's ε is quoted at (the scenario's); without it the lines omit δ.
    """
    if stream is None:
        return Progress()
    if plain is None:
        isatty = getattr(stream, "isatty", None)
        plain = not (callable(isatty) and isatty())
        if not plain:
            from rich.console import Console

            plain = Console(file=stream).is_dumb_terminal  # TERM=dumb: no cursor movement, so no live bar
    if plain:
        return PlainProgress(stream, delta=delta)
    return LiveProgress(stream, force_terminal=True, delta=delta)
