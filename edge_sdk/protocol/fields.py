"""Numbered-field canonical bytes for the round layer's signed messages (plan, Ready, Decline, model).

Why numbered fields and not the SecAgg+ codec's positional layout: a plan must stay loadable when
later versions add to it. Each field is ``u16 number ‖ u32 length ‖ value``, numbers strictly
ascending, so one value has one encoding (signatures stay stable) and a field that is absent takes
its default. Fields are never removed or renumbered; new ones are optional. A number this version
does not know is refused with an error saying the sender is newer, because a device must never
sign or act on terms it cannot read.

Values: unsigned integers u64 big-endian, floats IEEE-754 binary64 big-endian (finite only), text
UTF-8, bytes raw, string lists ``u32 count`` then ``u16 length ‖ UTF-8`` items, nested records as
the same field layout. The signature, when present, is the last field (number ``SIGNATURE_FIELD``),
and the signed payload is a per-type domain string followed by every byte before it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import FleetlearnError

SIGNATURE_FIELD = 0xFFFF
MAX_TEXT_BYTES = 4096
MAX_LIST_ITEMS = 1 << 20


class FieldFormatError(FleetlearnError, ValueError):
    """Round-layer bytes do not parse: truncated, out of order, unknown field, bad value."""


@dataclass(frozen=True)
class FieldKind:
    """How one field's value becomes bytes and back."""

    name: str
    write: Callable[[Any], bytes]
    read: Callable[[bytes, str], Any]


def _uint_w(v: int) -> bytes:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
        raise FieldFormatError(f"expected an unsigned 64-bit integer, got {v!r}")
    return struct.pack(">Q", v)


def _uint_r(raw: bytes, name: str) -> int:
    if len(raw) != 8:
        raise FieldFormatError(f"field {name} must be 8 bytes (u64), got {len(raw)}")
    return struct.unpack(">Q", raw)[0]


def _float_w(v: float) -> bytes:
    v = float(v)
    if not math.isfinite(v):
        raise FieldFormatError(f"expected a finite number, got {v!r}")
    return struct.pack(">d", v)


def _float_r(raw: bytes, name: str) -> float:
    if len(raw) != 8:
        raise FieldFormatError(f"field {name} must be 8 bytes (f64), got {len(raw)}")
    value = struct.unpack(">d", raw)[0]
    if not math.isfinite(value):
        raise FieldFormatError(f"field {name} is not a finite number")
    return value


def _text_w(v: str) -> bytes:
    raw = v.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES:
        raise FieldFormatError(f"text of {len(raw)} bytes exceeds {MAX_TEXT_BYTES}")
    return raw


def _text_r(raw: bytes, name: str) -> str:
    if len(raw) > MAX_TEXT_BYTES:
        raise FieldFormatError(f"field {name} holds {len(raw)} bytes of text, limit is {MAX_TEXT_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FieldFormatError(f"field {name} is not valid UTF-8") from None


def _texts_w(v: Sequence[str]) -> bytes:
    if len(v) > MAX_LIST_ITEMS:
        raise FieldFormatError(f"list of {len(v)} items exceeds {MAX_LIST_ITEMS}")
    parts = [struct.pack(">I", len(v))]
    for item in v:
        raw = item.encode("utf-8")
        if not 0 < len(raw) <= 0xFFFF:
            raise FieldFormatError(f"list item of {len(raw)} bytes must be 1..65535")
        parts.append(struct.pack(">H", len(raw)) + raw)
    return b"".join(parts)


def _texts_r(raw: bytes, name: str) -> tuple[str, ...]:
    if len(raw) < 4:
        raise FieldFormatError(f"field {name} is truncated (no item count)")
    (count,) = struct.unpack(">I", raw[:4])
    if count > MAX_LIST_ITEMS or count * 3 > len(raw) - 4:
        raise FieldFormatError(f"field {name} declares {count} items, more than it holds")
    pos, out = 4, []
    for _ in range(count):
        if pos + 2 > len(raw):
            raise FieldFormatError(f"field {name} is truncated")
        (n,) = struct.unpack(">H", raw[pos : pos + 2])
        if n == 0 or pos + 2 + n > len(raw):
            raise FieldFormatError(f"field {name} has an empty or truncated item")
        out.append(_text_r(raw[pos + 2 : pos + 2 + n], name))
        pos += 2 + n
    if pos != len(raw):
        raise FieldFormatError(f"field {name} has {len(raw) - pos} trailing bytes")
    return tuple(out)


UINT = FieldKind("uint", _uint_w, _uint_r)
FLOAT = FieldKind("float", _float_w, _float_r)
TEXT = FieldKind("text", _text_w, _text_r)
BYTES = FieldKind("bytes", bytes, lambda raw, name: bytes(raw))
TEXTS = FieldKind("texts", _texts_w, _texts_r)


def record_kind(schema: Schema, build: Callable[[dict[str, Any]], Any], split: Callable[[Any], Mapping[str, Any]]
                ) -> FieldKind:
    """A nested record: ``split`` turns the value into {name: value}, ``build`` makes it from one."""
    return FieldKind(
        "record",
        lambda v: encode_fields(schema, split(v)),
        lambda raw, name: build(decode_fields(schema, raw, name)),
    )


@dataclass(frozen=True)
class Field:
    """One numbered field; ``required`` fields must be present, others default to absent."""

    number: int
    name: str
    kind: FieldKind
    required: bool = True


Schema = tuple[Field, ...]


def encode_fields(schema: Schema, values: Mapping[str, Any]) -> bytes:
    """The canonical bytes of ``values`` (``None`` = absent) in ascending field order."""
    parts = []
    for f in schema:
        value = values.get(f.name)
        if value is None:
            if f.required:
                raise FieldFormatError(f"field {f.name} is required")
            continue
        try:
            raw = f.kind.write(value)
        except FieldFormatError as exc:
            raise FieldFormatError(f"field {f.name}: {exc}") from None
        parts.append(struct.pack(">HI", f.number, len(raw)) + raw)
    return b"".join(parts)


def split_records(data: bytes, what: str) -> list[tuple[int, bytes, int]]:
    """(number, value, offset) for each field; numbers must strictly ascend, nothing may trail."""
    data = bytes(data)
    out, pos, last = [], 0, -1
    while pos < len(data):
        if pos + 6 > len(data):
            raise FieldFormatError(f"{what} is truncated in a field header at offset {pos}")
        number, length = struct.unpack(">HI", data[pos : pos + 6])
        if number <= last:
            raise FieldFormatError(f"{what}: field {number} at offset {pos} is out of order or repeated")
        if pos + 6 + length > len(data):
            raise FieldFormatError(f"{what}: field {number} declares {length} bytes, more than remain")
        out.append((number, data[pos + 6 : pos + 6 + length], pos))
        pos, last = pos + 6 + length, number
    return out


def decode_fields(schema: Schema, data: bytes, what: str) -> dict[str, Any]:
    """Parse bytes written by ``encode_fields`` strictly; absent optional fields are ``None``."""
    by_number = {f.number: f for f in schema}
    values: dict[str, Any] = {f.name: None for f in schema}
    for number, raw, _ in split_records(data, what):
        f = by_number.get(number)
        if f is None:
            raise FieldFormatError(
                f"{what} carries field {number}, which this version of fleetlearn does not know: it was written by "
                "a newer version; upgrade this side"
            )
        values[f.name] = f.kind.read(raw, f"{what}.{f.name}")
    missing = [f.name for f in schema if f.required and values[f.name] is None]
    if missing:
        raise FieldFormatError(f"{what} lacks required field(s) {missing}")
    return values


def split_signature(data: bytes, what: str) -> tuple[bytes, bytes]:
    """(body, signature): the signature is the last field, if present; the body is every byte before it."""
    records = split_records(data, what)
    if records and records[-1][0] == SIGNATURE_FIELD:
        _, signature, offset = records[-1]
        return bytes(data[:offset]), signature
    return bytes(data), b""


def with_signature(body: bytes, signature: bytes) -> bytes:
    """``body`` followed by the signature field (nothing when unsigned)."""
    if not signature:
        return body
    return body + struct.pack(">HI", SIGNATURE_FIELD, len(signature)) + signature
