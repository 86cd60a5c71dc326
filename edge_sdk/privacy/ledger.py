"""The device's privacy ledger: a durable, append-only record of every participation.

Why write-ahead: the record of a participation must reach stable storage *before* the masked update
leaves the device, so a crash or power cut can only over-count privacy spent, never under-count it.
The agent calls ``record`` (which fsyncs) and sends only after it returns.

Format: JSON lines. Each record carries its sequence number, the checksum of the previous record
(a hash chain, so a deleted or reordered line is detected) and a SHA-256 of its own canonical JSON.
The first record holds the budget; later ``budget`` records change it; ``participation`` records hold
a ``ParticipationEvent`` (events, not epsilons: ``spent`` composes them when asked).

Why a head file (``<ledger>.head``): a chain cannot tell a ledger cut at a record boundary from a
shorter one. After each record's fsync the ledger's head (count and last checksum, ``LedgerHead``)
is written atomically beside it (tmp, fsync, rename, fsync dir). A crash between the two writes
leaves the head one record behind, which is accepted (the record is there: over-counting is the
safe side) and repaired; a head *ahead* of the ledger, or naming a different last record, is an
error. Restoring both files to an older copy is invisible here; the aggregator catches it from the
head each device signs into its masked input (``aggregator.accounting.participation_record``).

Failure policy:
- a record that fails its checksum or breaks the chain, or a ledger that does not match its head,
  raises ``LedgerCorruptError``; fewer records than the head proves were written (a cut, a torn
  record whose write had completed, an older copy, a deleted or emptied file) raises its subclass
  ``LedgerRollbackError``. The ledger is never reset or repaired silently (see docs/privacy.md);
- a final line cut short without its newline, and not covered by the head, is a torn write of a
  record whose fsync never returned, so its update was never sent; it is dropped with a warning.
  (A torn line that still verifies is kept: over-counting is the safe side.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import ConfigError, FleetlearnError
from edge_sdk.privacy.ledger_head import LedgerHead, LedgerHeadError
from edge_sdk.privacy.participation import ParticipationEvent
from edge_sdk.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, event_rdp

log = logging.getLogger(__name__)

LEDGER_FORMAT = 1
HEAD_FORMAT = 1
HEAD_SUFFIX = ".head"
_GENESIS = "0" * 64
_HEAD_FLAG = "head_file"  # set in the record from which on the ledger keeps a head file

__all__ = [
    "BudgetDecision", "BudgetExceededError", "DeviceLedger", "LedgerBusyError", "LedgerCorruptError",
    "LedgerError", "LedgerHead", "LedgerHeadError", "LedgerRollbackError", "LedgerSpend", "head_path",
]


class LedgerError(FleetlearnError):
    """The privacy ledger cannot be used."""


class LedgerCorruptError(LedgerError):
    """The ledger file fails its checksums or chain; it must be inspected, never silently reset."""


class LedgerRollbackError(LedgerCorruptError):
    """The ledger holds fewer records than it is known to have had: cut, rolled back, emptied or deleted.

    Raised locally (the head file proves more records) and by the aggregator (the device reported a
    head it has already passed); ``spent_participations``/``spent_epsilon`` carry the spend the
    raiser knows of, when it knows one.
    """

    def __init__(
        self,
        message: str,
        *,
        reported: LedgerHead | None = None,
        last_seen: LedgerHead | None = None,
        spent_participations: int | None = None,
        spent_epsilon: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reported = reported
        self.last_seen = last_seen
        self.spent_participations = spent_participations
        self.spent_epsilon = spent_epsilon


class LedgerBusyError(LedgerError):
    """Another process holds the ledger open."""


class BudgetExceededError(LedgerError):
    """Recording this participation would exceed the device's privacy budget."""

    def __init__(self, decision: BudgetDecision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a participation fits the budget, with the figures behind the answer."""

    accepted: bool
    epsilon_before: float
    epsilon_after: float
    local_epsilon_after: float
    budget_epsilon: float
    delta: float
    reason: str


@dataclass(frozen=True)
class LedgerSpend:
    """Privacy spent so far: central (with the rounds' honest-contributor guarantees) and local-only."""

    epsilon: float
    local_epsilon: float
    delta: float
    budget_epsilon: float
    participations: int

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self.budget_epsilon - self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; an unbounded epsilon (a non-private round) is ``None``."""
        return {
            "epsilon_spent": _finite_or_none(self.epsilon),
            "epsilon_remaining": self.remaining_epsilon,
            "local_epsilon_spent": _finite_or_none(self.local_epsilon),
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "participations": self.participations,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "checksum"})).hexdigest()


def _check_budget(budget_epsilon: float, delta: float) -> None:
    if not (budget_epsilon > 0 and math.isfinite(budget_epsilon)):
        raise ConfigError(f"budget_epsilon must be a finite number > 0, got {budget_epsilon}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def head_path(path: str | os.PathLike[str]) -> Path:
    """Where the head of the ledger at ``path`` is kept: ``<ledger>.head`` beside it."""
    path = Path(path)
    return path.with_name(path.name + HEAD_SUFFIX)


class DeviceLedger:
    """An open ledger file; use ``DeviceLedger.create``/``open`` and close it (or use ``with``)."""

    def __init__(self, path: Path, fd: int, records: list[dict[str, Any]]) -> None:
        self.path = path
        self._fd = fd
        self._records = records
        self._counts: Counter[ParticipationEvent] = Counter()
        self._curves: dict[tuple[ParticipationEvent, bool], np.ndarray] = {}
        self._budget_epsilon = 0.0
        self._delta = 0.0
        for record in records:
            try:
                self._apply(record)
            except (ConfigError, KeyError, TypeError, ValueError) as exc:
                raise LedgerCorruptError(
                    f"privacy ledger {path}, record {record.get('seq')} has invalid contents: {exc}"
                ) from exc

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], budget_epsilon: float, delta: float) -> DeviceLedger:
        """Create the ledger of a device that is enrolling; a ledger already at ``path`` is an error."""
        return cls.open(path, budget_epsilon, delta, create=True)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        budget_epsilon: float | None = None,
        delta: float | None = None,
        *,
        create: bool | None = None,
    ) -> DeviceLedger:
        """Open the ledger at ``path``, or create it.

        ``create=False``: the device is enrolled, so the ledger must exist (a missing one is an
        error, never a fresh start). ``create=True``: the device is enrolling, the ledger must not
        exist yet (a budget is required). ``create=None`` (the default, the earlier behaviour):
        create it when a budget is given and neither it nor its head exists. In every mode a head
        file without its ledger is a deleted ledger and raises ``LedgerRollbackError``.

        Giving a budget that differs from the stored one appends a ``budget`` record (so the
        change itself is on record); omitting it keeps the stored budget.
        """
        path = Path(path)
        if (budget_epsilon is None) != (delta is None):
            raise ConfigError("give both budget_epsilon and delta, or neither")
        if budget_epsilon is not None and delta is not None:
            _check_budget(budget_epsilon, delta)
        elif create:
            raise ConfigError("creating a privacy ledger needs a budget: give budget_epsilon and delta")
        may_create = budget_epsilon is not None and create is not False
        if not path.exists():
            _refuse_missing_ledger(path, enrolled=create is False, can_create=may_create)
        created = False
        try:
            if may_create:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(path, os.O_RDWR | os.O_APPEND)
            else:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            _refuse_missing_ledger(path, enrolled=create is False, can_create=False)
            raise  # unreachable: the call above always raises
        except OSError as exc:
            raise LedgerError(f"cannot open privacy ledger {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerBusyError(f"privacy ledger {path} is open in another process") from None
        try:
            ledger = cls._open_locked(path, fd, created, budget_epsilon, delta, create)
        except BaseException:
            if created and path.exists() and path.stat().st_size == 0:
                path.unlink()
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if budget_epsilon is not None and delta is not None and (
            budget_epsilon != ledger._budget_epsilon or delta != ledger._delta
        ):
            log.warning(
                "privacy budget of %s changes from epsilon=%g delta=%g to epsilon=%g delta=%g",
                path, ledger._budget_epsilon, ledger._delta, budget_epsilon, delta,
            )
            ledger._append("budget", {"budget_epsilon": budget_epsilon, "delta": delta})
        return ledger

    @classmethod
    def _open_locked(
        cls, path: Path, fd: int, created: bool, budget_epsilon: float | None, delta: float | None,
        create: bool | None,
    ) -> DeviceLedger:
        head = _read_head(path)
        if created or os.fstat(fd).st_size == 0:
            if head is not None and not head.is_genesis:
                raise LedgerRollbackError(
                    f"privacy ledger {path} is empty but its head {head_path(path)} says it held "
                    f"{head.sequence} records: the file was emptied; restore it from a backup, do not recreate it",
                    reported=LedgerHead.genesis(), last_seen=head,
                )
            if budget_epsilon is None or delta is None or create is False:
                raise LedgerCorruptError(
                    f"privacy ledger {path} is empty and has no opening record; this device is enrolled, so "
                    "restore the ledger from a backup (an empty file is a fresh start only when enrolling)"
                )
            if not created:
                # A crash between creating the file and writing its first record: nothing was ever
                # recorded (the opening record precedes every participation), so start it now.
                log.warning("privacy ledger %s is empty (interrupted creation); writing its opening record", path)
            _fsync_directory(path.parent)
            ledger = cls(path, fd, [])
            ledger._append(
                "open", {"format": LEDGER_FORMAT, "budget_epsilon": budget_epsilon, "delta": delta, _HEAD_FLAG: True}
            )
            log.info("created privacy ledger %s with budget epsilon=%g delta=%g", path, budget_epsilon, delta)
            return ledger
        if create is True:
            raise LedgerError(
                f"privacy ledger {path} already exists; a device that is enrolled opens it (create=False), "
                "it never creates a new one"
            )
        ledger = cls(path, fd, _read_records(path, fd, head))
        if head is None:
            if _head_flag_index(ledger._records) is None:
                log.warning(
                    "privacy ledger %s has no head file (written before ledgers kept one); adopting its %d "
                    "records as they stand and keeping a head from now on", path, len(ledger._records),
                )
                ledger._append(
                    "budget", {"budget_epsilon": ledger._budget_epsilon, "delta": ledger._delta, _HEAD_FLAG: True}
                )
            else:
                log.info("privacy ledger %s: writing the head its last record's crash left unwritten", path)
                ledger._write_head()
        elif head.sequence < len(ledger._records):
            behind = len(ledger._records) - head.sequence
            (log.info if behind == 1 else log.warning)(
                "privacy ledger %s: its head was %d record(s) behind (%s); every record is there, "
                "rewriting the head", path, behind,
                "a crash between a record and its head" if behind == 1 else "the head file was restored from an "
                "older copy",
            )
            ledger._write_head()
        return ledger

    @classmethod
    def snapshot(cls, path: str | os.PathLike[str]) -> DeviceLedger:
        """A read-only view that takes no lock, for inspection while an agent holds the ledger.

        A torn final line (a write in progress) is ignored, not repaired; ``record`` is refused.
        The head is read before the ledger, so records appended meanwhile only put it behind.
        """
        path = Path(path)
        head = _read_head(path)
        if not path.exists():
            _refuse_missing_ledger(path, enrolled=False, can_create=False)
        return cls(path, -1, _read_records(path, None, head))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the flock
            self._fd = -1

    def __enter__(self) -> DeviceLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------------------
    @property
    def budget_epsilon(self) -> float:
        return self._budget_epsilon

    @property
    def delta(self) -> float:
        return self._delta

    def head(self) -> LedgerHead:
        """The ledger's head now: taken right after ``record`` returns, it covers that participation."""
        if not self._records:
            return LedgerHead.genesis()
        return LedgerHead(len(self._records), bytes.fromhex(self._records[-1]["checksum"]))

    def participations(self) -> list[tuple[str, ParticipationEvent]]:
        """Every recorded (round id, event), oldest first."""
        return [
            (r["data"]["round"], ParticipationEvent.from_dict(r["data"]["event"]))
            for r in self._records
            if r["kind"] == "participation"
        ]

    def spent(self) -> LedgerSpend:
        return LedgerSpend(
            epsilon=self._epsilon(self._counts, local_only=False),
            local_epsilon=self._epsilon(self._counts, local_only=True),
            delta=self._delta,
            budget_epsilon=self._budget_epsilon,
            participations=sum(self._counts.values()),
        )

    def check(self, event: ParticipationEvent) -> BudgetDecision:
        """Would one more participation described by ``event`` stay within the budget?"""
        before = self._epsilon(self._counts, local_only=False)
        after_counts = self._counts.copy()
        after_counts[event] += 1
        after = self._epsilon(after_counts, local_only=False)
        local_after = self._epsilon(after_counts, local_only=True)
        accepted = after <= self._budget_epsilon
        if accepted:
            reason = f"epsilon {before:.4g} -> {after:.4g} is within the budget {self._budget_epsilon:.4g}"
        else:
            reason = (
                f"participating would raise epsilon from {before:.4g} to {after:.4g}, over the device budget "
                f"{self._budget_epsilon:.4g} at delta={self._delta:.3g} (ledger {self.path})"
            )
        return BudgetDecision(accepted, before, after, local_after, self._budget_epsilon, self._delta, reason)

    # -- recording -----------------------------------------------------------------------------
    def participate(self, round_id: str, event: ParticipationEvent) -> BudgetDecision:
        """``record`` that reports a decline as a result instead of raising: check ``.accepted``.

        A declined round is logged (warning) and nothing is written; an accepted one is durably
        recorded before this returns, and only then may the update be sent.
        """
        try:
            return self.record(round_id, event)
        except BudgetExceededError as exc:
            return exc.decision

    def record(self, round_id: str, event: ParticipationEvent) -> BudgetDecision:
        """Check the budget, then durably record the participation (fsynced, head too) before returning.

        Declines with ``BudgetExceededError`` (and a warning log line) when over budget. The caller
        must send the update only after this returns, with ``head()`` signed into it.
        """
        decision = self.check(event)
        if not decision.accepted:
            log.warning("declining round %s: %s", round_id, decision.reason)
            raise BudgetExceededError(decision)
        self._append("participation", {"round": str(round_id), "event": event.to_dict()})
        return decision

    # -- internals -----------------------------------------------------------------------------
    def _epsilon(self, counts: Counter[ParticipationEvent], local_only: bool) -> float:
        if not counts:
            return 0.0
        total = np.zeros_like(DEFAULT_ORDERS)
        for event, count in counts.items():
            key = (event, local_only)
            if key not in self._curves:
                self._curves[key] = event_rdp(event, DEFAULT_ORDERS, local_only)
            total = total + count * self._curves[key]
        return epsilon_from_rdp(DEFAULT_ORDERS, total, self._delta)

    def _apply(self, record: dict[str, Any]) -> None:
        data = record["data"]
        if record["kind"] in ("open", "budget"):
            self._budget_epsilon = float(data["budget_epsilon"])
            self._delta = float(data["delta"])
        elif record["kind"] == "participation":
            self._counts[ParticipationEvent.from_dict(data["event"])] += 1

    def _append(self, kind: str, data: dict[str, Any]) -> None:
        """Write and fsync the record, then the head: a crash in between leaves the head one behind."""
        if self._fd < 0:
            raise LedgerError(f"privacy ledger {self.path} is closed or opened read-only")
        record: dict[str, Any] = {
            "seq": len(self._records),
            "kind": kind,
            "time": time.time(),
            "prev": self._records[-1]["checksum"] if self._records else _GENESIS,
            "data": data,
        }
        record["checksum"] = _checksum(record)
        line = _canonical(record) + b"\n"
        written = os.write(self._fd, line)
        if written != len(line):
            raise LedgerError(f"short write to privacy ledger {self.path} ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self._records.append(record)
        self._apply(record)
        self._write_head()

    def _write_head(self) -> None:
        head = self.head()
        body: dict[str, Any] = {"format": HEAD_FORMAT, **head.to_dict()}
        body["checksum"] = _checksum(body)
        target = head_path(self.path)
        tmp = target.with_name(target.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, _canonical(body) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_directory(target.parent)
        except OSError as exc:
            raise LedgerError(
                f"privacy ledger {self.path}: record {head.sequence - 1} is durable but its head {target} could "
                f"not be written ({exc}); the participation counts, do not send its update"
            ) from exc


def _refuse_missing_ledger(path: Path, enrolled: bool, can_create: bool) -> None:
    """Raise for a ledger that is not there, unless creating it is what was asked."""
    head = _read_head(path)
    if head is not None:
        raise LedgerRollbackError(
            f"privacy ledger {path} is missing but its head {head_path(path)} says it held {head.sequence} "
            "records: the ledger was deleted; restore it from a backup, do not recreate it",
            reported=LedgerHead.genesis(), last_seen=head,
        )
    if can_create:
        return
    if enrolled:
        raise LedgerError(
            f"no privacy ledger at {path}, and this device is enrolled: a missing ledger is not a fresh start; "
            "restore it from a backup (the aggregator's record says how much this device has spent)"
        )
    raise LedgerError(f"no privacy ledger at {path}; create one by giving a budget (epsilon, delta)")


def _read_head(path: Path) -> LedgerHead | None:
    """The stored head of the ledger at ``path``, or None if it has no head file."""
    target = head_path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read the head {target} of privacy ledger {path}: {exc}") from exc
    try:
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("checksum") != _checksum(body):
            raise ValueError("it fails its checksum")
        if body.get("format") != HEAD_FORMAT:
            raise ValueError(f"unknown format {body.get('format')!r}")
        return LedgerHead.from_dict(body)
    except (ValueError, LedgerHeadError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LedgerCorruptError(
            f"the head {target} of privacy ledger {path} is unreadable ({exc}); inspect it, do not delete it"
        ) from None


def _head_flag_index(records: list[dict[str, Any]]) -> int | None:
    """The first record from which on the ledger keeps a head file, or None (a ledger from before)."""
    for index, record in enumerate(records):
        if record["kind"] in ("open", "budget") and record["data"].get(_HEAD_FLAG) is True:
            return index
    return None


def _check_head(path: Path, records: list[dict[str, Any]], head: LedgerHead | None, torn: bool) -> None:
    """Raise unless ``records`` contain everything ``head`` proves was written."""
    count = len(records)
    if head is None:
        flagged = _head_flag_index(records)
        if flagged is not None and count > flagged + 1:
            raise LedgerCorruptError(
                f"the head {head_path(path)} of privacy ledger {path} is missing, but the ledger keeps one since "
                f"record {flagged}: records may have been cut off the end with it; restore both from a backup"
            )
        return
    if head.sequence > count:
        lost = head.sequence - count
        what = (
            "its last record is torn although its write had completed"
            if torn and lost == 1
            else f"{lost} record(s) were cut off the end, or the file was restored from an older copy"
        )
        raise LedgerRollbackError(
            f"privacy ledger {path} holds {count} records but its head {head_path(path)} says {head.sequence}: "
            f"{what}; restore the newest copy, never reset it",
            reported=LedgerHead(count, bytes.fromhex(records[-1]["checksum"])) if records else LedgerHead.genesis(),
            last_seen=head,
        )
    if not head.is_genesis and records[head.sequence - 1]["checksum"] != head.digest.hex():
        raise LedgerCorruptError(
            f"privacy ledger {path}: record {head.sequence - 1} is not the one its head {head_path(path)} names "
            "(the ledger was replaced by a different copy); inspect both, do not delete them"
        )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(path: Path, fd: int | None, head: LedgerHead | None) -> list[dict[str, Any]]:
    """Verify and return every record, checked against ``head``; with ``fd`` (locked), settle a torn tail.

    The head is checked before the tail is touched, so a torn record the head covers is reported,
    never truncated away.
    """
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        records.append(_verify(path, number, line, records))
    tail_record = None
    if tail:
        with contextlib.suppress(LedgerCorruptError):
            tail_record = _verify(path, len(lines) + 1, tail, records)
    if tail_record is not None:
        records.append(tail_record)
    _check_head(path, records, head, torn=bool(tail) and tail_record is None)
    if tail and fd is not None:
        if tail_record is not None:
            os.write(fd, b"\n")
            os.fsync(fd)
            log.warning("privacy ledger %s: completed a final record that lacked its newline", path)
        else:
            log.warning(
                "privacy ledger %s: dropping a torn final write of %d bytes (its fsync never returned, "
                "so its update was never sent)", path, len(tail),
            )
            os.ftruncate(fd, len(raw) - len(tail))
            os.fsync(fd)
    if not records or records[0]["kind"] != "open":
        raise LedgerCorruptError(f"privacy ledger {path} has no opening record; inspect it, do not delete it")
    if records[0]["data"].get("format") != LEDGER_FORMAT:
        raise LedgerCorruptError(f"privacy ledger {path} has unknown format {records[0]['data'].get('format')!r}")
    return records


def _verify(path: Path, number: int, line: bytes, previous: list[dict[str, Any]]) -> dict[str, Any]:
    where = f"privacy ledger {path}, line {number}"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LedgerCorruptError(f"{where} is not valid JSON ({exc}); inspect it, do not delete it") from None
    if (
        not isinstance(record, dict)
        or not {"seq", "kind", "prev", "data", "checksum"} <= record.keys()
        or not isinstance(record["data"], dict)
    ):
        raise LedgerCorruptError(f"{where} is missing required fields; inspect it, do not delete it")
    if record["checksum"] != _checksum(record):
        raise LedgerCorruptError(f"{where} fails its checksum; inspect it, do not delete it")
    expected_prev = previous[-1]["checksum"] if previous else _GENESIS
    if record["seq"] != len(previous) or record["prev"] != expected_prev:
        raise LedgerCorruptError(f"{where} breaks the record chain (a record was removed or reordered)")
    if record["kind"] not in ("open", "budget", "participation"):
        raise LedgerCorruptError(f"{where} has unknown kind {record['kind']!r}")
    return record
