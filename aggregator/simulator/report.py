"""A run's durable output: ``runs/<id>/report.json`` and three PNG plots beside it.

Why these rules: the report is what a user compares across runs (same seed, same report, timings
aside), so it is written atomically (a half-written report never exists), only with finite numbers
(a NaN would silently break every reader's JSON), with sorted keys (diffs stay small), and never
over another run's report (run ids are unique; an existing report is evidence, not scratch space).
The plots use matplotlib's object API on an Agg canvas: no display, no pyplot global state, and
matplotlib is imported only when plotting, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Container, Mapping
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_sdk.errors import FleetlearnError

from .records import REPORT_FORMAT, RoundOutcome, SimulationReport

REPORT_NAME = "report.json"
PLOT_NAMES = ("accuracy.png", "epsilon.png", "bytes.png")
PLOT_SIZE_INCHES = (8.0, 4.5)
PLOT_DPI = 100  # 800 x 450 pixels

_STATUSES = ("completed", "aborted")


class ReportError(FleetlearnError):
    """A report cannot be written (non-finite value, another run's report in the way) or read (damaged)."""


# -- run ids ----------------------------------------------------------------------------------------


def new_run_id(now: datetime, seed: int, *, taken: Container[str] | Path | None = None) -> str:
    """A sortable id, ``YYYYMMDD-HHMMSS-s<seed>``, with ``-2``, ``-3`` ... if that one is ``taken``.

    ``taken`` is a set of ids or the runs directory (its entries are the ids in use). Sorting ids
    as strings sorts runs by start time; the seed is in the name so a listing shows it.
    """
    if seed < 0:
        raise ReportError(f"seed={seed}: need a seed >= 0")
    base = f"{now.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    if taken is None:
        return base
    in_use = (lambda name: (taken / name).exists()) if isinstance(taken, Path) else taken.__contains__
    candidate, n = base, 1
    while in_use(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def make_run_dir(runs_dir: Path, now: datetime, seed: int) -> Path:
    """Create and return ``runs_dir/<new id>``; ``mkdir`` without ``exist_ok`` makes the id ours even in a race."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = runs_dir / new_run_id(now, seed, taken=runs_dir)
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue  # another process took it between the check and the mkdir: take the next suffix
        return run_dir


# -- writing ----------------------------------------------------------------------------------------


def _non_finite(value: Any, where: str) -> str | None:
    """The path of the first NaN/inf inside ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}={value!r}"
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _non_finite(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _check_finite(report: SimulationReport, data: Mapping[str, Any]) -> None:
    for outcome in report.rounds:
        found = _non_finite(outcome.to_json(), "")
        if found:
            raise ReportError(f"round {outcome.round_index}: {found}; the report holds finite numbers only "
                              "(a NaN accuracy or loss means the model diverged: lower lr or clip)")
    found = _non_finite({k: v for k, v in data.items() if k != "rounds"}, "")
    if found:
        raise ReportError(f"report {found}; the report holds finite numbers only")


def report_text(report: SimulationReport) -> str:
    """The exact bytes (as text) ``write_report`` stores: sorted keys, 2-space indent, a final newline."""
    data = report.to_json()
    _check_finite(report, data)
    try:
        return json.dumps(data, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ReportError(f"run {report.run_id}: the report holds a value JSON cannot: {exc}") from None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing_run_id(path: Path) -> str | None:
    try:
        run_id = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def write_report(report: SimulationReport, run_dir: Path) -> Path:
    """Write ``run_dir/report.json`` atomically and durably; returns its path.

    Writing the same run's report again (say after each round) replaces it; a report of another
    run, or a file that is not a report, is never replaced.
    """
    text = report_text(report)  # every check before anything touches the disk
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    target = run_dir / REPORT_NAME
    temporary = run_dir / f".{REPORT_NAME}.{os.getpid()}.tmp"

    def refuse(holder: str | None) -> ReportError:
        what = f"the report of run {holder!r}" if holder else "a file that is not a fleetlearn report"
        return ReportError(f"{target} already holds {what}; not overwritten (run {report.run_id!r} needs its "
                           "own run directory: run ids are unique)")

    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists() or target.is_symlink():
            holder = _existing_run_id(target)
            if holder != report.run_id:
                raise refuse(holder)
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)  # atomic, and refuses if another writer got there first
            except FileExistsError:
                raise refuse(_existing_run_id(target)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_directory(run_dir)
    return target


# -- reading ----------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TOP_FIELDS: dict[str, tuple[str, Any]] = {
    "run_id": ("a string", lambda v: isinstance(v, str)),
    "config": ("an object", lambda v: isinstance(v, dict)),
    "broker": ("a string", lambda v: isinstance(v, str)),
    "delta": ("a number", _is_number),
    "final_accuracy": ("a number or null", lambda v: v is None or _is_number(v)),
    "final_epsilon": ("a number", _is_number),
    "rounds": ("a list", lambda v: isinstance(v, list)),
    "timings": ("an object", lambda v: isinstance(v, dict)),
}


def _stage_counts(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) and n >= 0 for k, n in v.items())


_ROUND_FIELDS: dict[str, tuple[str, Any]] = {
    "round_index": ("an integer", _is_int),
    "status": (f"one of {', '.join(_STATUSES)}", lambda v: v in _STATUSES),
    "abort_reason": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "invited": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "participants": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "dropouts": ("an object of stage -> count", _stage_counts),
    "crashes": ("an object of stage -> count", _stage_counts),
    "accuracy": ("a number or null", lambda v: v is None or _is_number(v)),
    "loss": ("a number or null", lambda v: v is None or _is_number(v)),
    "epsilon": ("a number", _is_number),
    "messages": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "bytes_up": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "bytes_down": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "seconds": ("a number", _is_number),
    "retransmissions": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def load_report(path: Path) -> dict[str, Any]:
    """Read a report.json (or the run directory holding one) and check its format; names what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such report") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path} is damaged: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is damaged or truncated: not JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno})") from None
    except ValueError as exc:
        raise ReportError(f"{path} is damaged: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a simulation report: its top level is {_kind(data)}, not an object")
    if "format" not in data:
        raise ReportError(f"{path} is not a simulation report: no 'format' field")
    if data["format"] != REPORT_FORMAT:
        raise ReportError(f"{path} has report format {data['format']!r}; this fleetlearn reads format "
                          f"{REPORT_FORMAT}")
    for name, (need, ok) in _TOP_FIELDS.items():
        if name not in data:
            raise ReportError(f"{path} is damaged: no {name!r} field")
        if not ok(data[name]):
            raise ReportError(f"{path} is damaged: {name!r} is {_kind(data[name])}, need {need}")
    for i, entry in enumerate(data["rounds"]):
        if not isinstance(entry, dict):
            raise ReportError(f"{path} is damaged: rounds[{i}] is {_kind(entry)}, need an object")
        label = f"rounds[{i}]" + (f" (round {entry['round_index']})" if _is_int(entry.get("round_index")) else "")
        for name, (need, ok) in _ROUND_FIELDS.items():
            if name not in entry:
                raise ReportError(f"{path} is damaged: {label} has no {name!r} field")
            if not ok(entry[name]):
                raise ReportError(f"{path} is damaged: {label} {name!r} is {entry[name]!r}, need {need}")
    return data


def report_from_json(data: Mapping[str, Any]) -> SimulationReport:
    """The ``SimulationReport`` a checked report dict (``load_report``) describes, e.g. to plot it again."""
    rounds = [RoundOutcome(**{f.name: entry[f.name] for f in fields(RoundOutcome)}) for entry in data["rounds"]]
    return SimulationReport(run_id=data["run_id"], config=dict(data["config"]), broker=data["broker"],
                            delta=data["delta"], rounds=rounds, timings=dict(data["timings"]))


# -- plots ------------------------------------------------------------------------------------------


def _byte_scale(largest: float) -> tuple[float, str]:
    for factor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= factor:
            return factor, unit
    return 1.0, "bytes"


def plot_report(report: SimulationReport, run_dir: Path) -> list[Path]:
    """Write accuracy.png, epsilon.png and bytes.png into ``run_dir``; returns their paths in that order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: matplotlib costs ~0.3 s to import
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir.mkdir(parents=True, exist_ok=True)
    rounds = report.rounds
    xs = [r.round_index for r in rounds]
    aborted = [r.round_index for r in rounds if r.status != "completed"]
    title = f"run {report.run_id}"

    def figure() -> tuple[Any, Any]:
        fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if xs:
            ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        else:
            ax.text(0.5, 0.5, "no rounds ran", transform=ax.transAxes, ha="center", va="center")
        return fig, ax

    def mark_aborted(ax: Any) -> None:
        for i, x in enumerate(aborted):
            ax.axvspan(x - 0.5, x + 0.5, color="tab:red", alpha=0.15, lw=0, label="aborted round" if i == 0 else None)

    def save(fig: Any, name: str) -> Path:
        target = run_dir / name
        temporary = run_dir / f".{name}.{os.getpid()}.tmp"
        try:
            fig.savefig(temporary, format="png", dpi=PLOT_DPI, metadata={"Software": None})
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return target

    paths = []

    fig, ax = figure()
    scored = [(r.round_index, r.accuracy) for r in rounds if r.accuracy is not None]
    losses = [(r.round_index, r.loss) for r in rounds if r.loss is not None]
    mark_aborted(ax)
    if scored:
        ax.plot([x for x, _ in scored], [a for _, a in scored], marker="o", ms=3, color="tab:blue", label="accuracy")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    loss_ax = ax.twinx()
    if losses:
        loss_ax.plot([x for x, _ in losses], [v for _, v in losses], marker="s", ms=3, color="tab:orange", label="loss")
    loss_ax.set_ylabel("held-out loss")
    handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="center right")
    ax.set_title(f"{title}: accuracy and loss")
    paths.append(save(fig, PLOT_NAMES[0]))

    fig, ax = figure()
    mark_aborted(ax)
    if rounds:
        ax.step(xs, [r.epsilon for r in rounds], where="post", marker="o", ms=3, color="tab:green",
                label="cumulative ε")
    target = report.config.get("epsilon")
    if _is_number(target):
        ax.axhline(target, color="tab:red", ls="--", label=f"target ε = {target:g}")
    ax.set_ylabel(f"ε at δ = {report.delta:g}")
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.set_title(f"{title}: privacy spent")
    paths.append(save(fig, PLOT_NAMES[1]))

    fig, ax = figure()
    factor, unit = _byte_scale(max([r.bytes_up for r in rounds] + [r.bytes_down for r in rounds] + [0]))
    mark_aborted(ax)
    if rounds:
        ax.bar([x - 0.2 for x in xs], [r.bytes_up / factor for r in rounds], width=0.4, color="tab:purple",
               label="up (devices → aggregator)")
        ax.bar([x + 0.2 for x in xs], [r.bytes_down / factor for r in rounds], width=0.4, color="tab:cyan",
               label="down (aggregator → devices)")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.25)  # head room for the legend above the bars
        ax.legend(loc="upper left", ncols=3, fontsize="small")
    ax.set_ylabel(f"{unit} per round")
    ax.set_title(f"{title}: traffic through the aggregator's connection")
    paths.append(save(fig, PLOT_NAMES[2]))
    return paths

