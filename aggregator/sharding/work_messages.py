"""The coordinator's task and a worker's answer: signed records in numbered fields, checked strictly.

Why signed with the aggregator's key on both sides: workers hold it (they sign RoundStarts and
relays for their sub-cohorts, so devices see one aggregator), and the coordinator accepts a result
only with a valid signature under that key, so a broker client that is not a worker cannot inject a
sum. A result is refused unless it answers the task the coordinator sent (fleet, round, task,
attempt), comes from the worker that claimed it, and a DONE sum has the plan's bits and length,
contributors inside the sub-cohort, each once, at least t_honest of them, and one 40-byte ledger
head each (``check_result``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np

from edge_sdk.errors import FleetlearnError
from edge_sdk.protocol.fields import (
    BYTES,
    TEXT,
    TEXTS,
    UINT,
    Field,
    FieldFormatError,
    decode_fields,
    encode_fields,
    split_signature,
    with_signature,
)
from edge_sdk.protocol.plan import RoundPlan, check_identifier
from edge_sdk.protocol.signing import sign_body, verify_body
from edge_sdk.secagg.codec import LEDGER_HEAD_BYTES
from edge_sdk.secagg.keys import IdentityKey
from edge_sdk.wire.bitpack import pack_bits, packed_size, unpack_bits
from edge_sdk.wire.errors import WireFormatError

TASK_DOMAIN = b"fleetlearn/shard/v1/task\x00"
RESULT_DOMAIN = b"fleetlearn/shard/v1/result\x00"
ANY_WORKER = ""  # Task.worker for a task on the shared subscription: whichever worker takes it


class WorkMessageError(FleetlearnError, ValueError):
    """A task or result is malformed, unsigned, or does not answer what it claims to; the message says which."""


class ResultStatus(enum.IntEnum):
    ACCEPTED = 1  # the worker took the task; it sends this before any RoundStart leaves
    SESSION = 2  # the roster went out: ``session_id`` is the SecAgg+ session (so the coordinator can abort it)
    DONE = 3  # the unmasked sub-cohort sum, its contributors and their ledger heads
    FAILED = 4  # the sub-cohort's SecAgg+ session aborted (``reason``)


@dataclass(frozen=True)
class Task:
    """Coordinator → worker: run SecAgg+ for ``cohort`` under the signed ``plan``."""

    fleet: str
    round_index: int
    task_id: int
    attempt: int
    worker: str  # the worker it is for, or ANY_WORKER
    plan: bytes  # RoundPlan.to_bytes() of the signed plan
    cohort: tuple[str, ...]
    directory_digest: bytes
    signature: bytes = b""

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.round_index, self.task_id, self.attempt)

    def body(self) -> bytes:
        values = {**vars(self), "worker": self.worker or None}
        values.pop("signature")
        return encode_fields(_TASK, values)

    def sign(self, identity: IdentityKey) -> Task:
        return replace(self, signature=sign_body(TASK_DOMAIN, self.body(), identity))

    def verify(self, aggregator_public: bytes) -> None:
        verify_body(TASK_DOMAIN, self.body(), self.signature, aggregator_public, f"task {self.key}")

    def round_plan(self) -> RoundPlan:
        return RoundPlan.from_bytes(self.plan)

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Task:
        try:
            body, signature = split_signature(data, "Task")
            v = decode_fields(_TASK, body, "Task")
        except FieldFormatError as exc:
            raise WorkMessageError(str(exc)) from None
        task = cls(v["fleet"], v["round_index"], v["task_id"], v["attempt"], v["worker"] or ANY_WORKER, v["plan"],
                   tuple(v["cohort"]), v["directory_digest"], signature)
        _check_ids(task.fleet, task.worker, task.cohort)
        return task


@dataclass(frozen=True)
class TaskResult:
    """Worker → coordinator: progress or the outcome of one task attempt."""

    fleet: str
    round_index: int
    task_id: int
    attempt: int
    worker: str
    status: ResultStatus
    session_id: bytes = b""
    bits: int = 0
    count: int = 0
    packed_sum: bytes = b""
    contributors: tuple[str, ...] = ()
    ledger_heads: bytes = b""  # 40 bytes per contributor, in contributor order
    reason: str = ""
    signature: bytes = b""

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.round_index, self.task_id, self.attempt)

    @classmethod
    def done(cls, task: Task, worker: str, session_id: bytes, bits: int, total: np.ndarray,
             contributors: tuple[str, ...], heads: dict[str, bytes]) -> TaskResult:
        return cls(task.fleet, task.round_index, task.task_id, task.attempt, worker, ResultStatus.DONE, session_id,
                   bits, len(total), pack_bits(np.asarray(total, dtype=np.uint32), bits), tuple(contributors),
                   b"".join(heads[d] for d in contributors))

    def body(self) -> bytes:
        values = dict(vars(self))
        values.pop("signature")
        values["status"] = int(self.status)
        for name in ("session_id", "packed_sum", "ledger_heads", "reason"):
            values[name] = values[name] or None
        values["contributors"] = values["contributors"] or None
        return encode_fields(_RESULT, values)

    def sign(self, identity: IdentityKey) -> TaskResult:
        return replace(self, signature=sign_body(RESULT_DOMAIN, self.body(), identity))

    def verify(self, aggregator_public: bytes) -> None:
        verify_body(RESULT_DOMAIN, self.body(), self.signature, aggregator_public,
                    f"result of task {self.key} from worker {self.worker!r}")

    def to_bytes(self) -> bytes:
        return with_signature(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskResult:
        try:
            body, signature = split_signature(data, "TaskResult")
            v = decode_fields(_RESULT, body, "TaskResult")
            status = ResultStatus(v["status"])
        except FieldFormatError as exc:
            raise WorkMessageError(str(exc)) from None
        except ValueError:
            raise WorkMessageError(f"TaskResult status {v['status']} is not one of "
                                   f"{[s.value for s in ResultStatus]}") from None
        result = cls(v["fleet"], v["round_index"], v["task_id"], v["attempt"], v["worker"], status,
                     v["session_id"] or b"", v["bits"] or 0, v["count"] or 0, v["packed_sum"] or b"",
                     tuple(v["contributors"] or ()), v["ledger_heads"] or b"", v["reason"] or "", signature)
        _check_ids(result.fleet, result.worker, result.contributors)
        return result


@dataclass(frozen=True)
class CheckedSum:
    """A DONE result that passed ``check_result``."""

    total: np.ndarray
    contributors: tuple[str, ...]
    ledger_heads: dict[str, bytes]


def check_result(result: TaskResult, task: Task, plan: RoundPlan, aggregator_public: bytes,
                 claimed_by: str | None) -> CheckedSum | None:
    """Verify ``result`` against the task it answers; the checked sum for DONE, None for the other statuses."""
    result.verify(aggregator_public)
    if (result.fleet, result.key) != (task.fleet, task.key):
        raise WorkMessageError(f"result answers task {result.key} of fleet {result.fleet!r}, not {task.key}")
    if task.worker and result.worker != task.worker:
        raise WorkMessageError(f"task {task.key} went to worker {task.worker!r}, the result is from {result.worker!r}")
    if claimed_by is not None and result.worker != claimed_by:
        raise WorkMessageError(f"task {task.key} was claimed by worker {claimed_by!r}, not {result.worker!r}")
    if result.status is not ResultStatus.DONE:
        return None
    if result.bits != plan.encoding.bits or result.count != plan.vector_length:
        raise WorkMessageError(f"sum of task {task.key} has {result.count} values at {result.bits} bits; the plan "
                               f"says {plan.vector_length} at {plan.encoding.bits}")
    if len(result.packed_sum) != packed_size(result.count, result.bits):
        raise WorkMessageError(f"sum of task {task.key} packs {len(result.packed_sum)} bytes, "
                               f"{packed_size(result.count, result.bits)} expected")
    members = set(task.cohort)
    outside = [d for d in result.contributors if d not in members]
    if outside:
        raise WorkMessageError(f"task {task.key} names contributors outside its sub-cohort: {outside[:5]}")
    if len(set(result.contributors)) != len(result.contributors):
        raise WorkMessageError(f"task {task.key} names a contributor twice")
    if len(result.contributors) < plan.t_honest:
        raise WorkMessageError(f"task {task.key} summed {len(result.contributors)} contributors, below the plan's "
                               f"t_honest={plan.t_honest}")
    if len(result.ledger_heads) != LEDGER_HEAD_BYTES * len(result.contributors):
        raise WorkMessageError(f"task {task.key} carries {len(result.ledger_heads)} bytes of ledger heads for "
                               f"{len(result.contributors)} contributors")
    try:
        total = unpack_bits(result.packed_sum, result.bits, result.count)
    except WireFormatError as exc:
        raise WorkMessageError(f"sum of task {task.key}: {exc}") from None
    heads = {d: result.ledger_heads[i * LEDGER_HEAD_BYTES:(i + 1) * LEDGER_HEAD_BYTES]
             for i, d in enumerate(result.contributors)}
    return CheckedSum(total.astype(np.uint32), result.contributors, heads)


def _check_ids(fleet: str, worker: str, devices: tuple[str, ...]) -> None:
    try:
        check_identifier(fleet, "fleet")
        if worker:
            check_identifier(worker, "worker id")
        for device in devices:
            check_identifier(device, "device id")
    except FleetlearnError as exc:
        raise WorkMessageError(str(exc)) from None


_TASK = (Field(1, "fleet", TEXT), Field(2, "round_index", UINT), Field(3, "task_id", UINT), Field(4, "attempt", UINT),
         Field(5, "worker", TEXT, required=False), Field(6, "plan", BYTES), Field(7, "cohort", TEXTS),
         Field(8, "directory_digest", BYTES))
_RESULT = (Field(1, "fleet", TEXT), Field(2, "round_index", UINT), Field(3, "task_id", UINT),
           Field(4, "attempt", UINT), Field(5, "worker", TEXT), Field(6, "status", UINT),
           Field(7, "session_id", BYTES, required=False), Field(8, "bits", UINT), Field(9, "count", UINT),
           Field(10, "packed_sum", BYTES, required=False), Field(11, "contributors", TEXTS, required=False),
           Field(12, "ledger_heads", BYTES, required=False), Field(13, "reason", TEXT, required=False))
