"""Big-endian fixed-width fields and bounded lengths, read strictly: the one reader of every frame here.

Why not the SecAgg+ codec's reader: its bounds are global constants and its errors are
``MessageFormatError``; wire frames are bounded by ``WireLimits`` and must say which limit a
field broke, in a ``WireFormatError``.
"""

from __future__ import annotations

import struct

from edge_sdk.wire.errors import WireFormatError

_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_FORBIDDEN_ID_CHARS = ("+", "#", "/", "\x00")


def check_id(value: str, field: str, max_bytes: int) -> bytes:
    """``value`` as UTF-8 if it can name a fleet or device: 1..max_bytes bytes, no ``+ # /``, NUL or whitespace.

    The one id rule of fleetlearn (the store, the state directory and the round layer call it): an id
    is an MQTT topic level, so no wildcard or separator, and a line of a Mosquitto ACL or password
    file, which splits on whitespace, so no whitespace or other unprintable character either.
    """
    if not isinstance(value, str):
        raise WireFormatError(f"{field} must be a str, got {type(value).__name__}")
    raw = value.encode("utf-8", errors="surrogatepass")
    if not 1 <= len(raw) <= max_bytes:
        raise WireFormatError(f"{field} must be 1..{max_bytes} UTF-8 bytes, got {len(raw)}")
    bad = [c for c in _FORBIDDEN_ID_CHARS if c in value]
    if bad:
        raise WireFormatError(f"{field} {value!r} contains {bad[0]!r}: ids may not contain '+', '#', '/' or NUL "
                              "(they are MQTT topic levels)")
    # str.isprintable is false for every separator but the ASCII space and for every control
    # character, so this is "no whitespace, nothing unprintable" in two C-speed passes (a generator
    # over the characters was 0.3 s of a 100-device round).
    if not value.isprintable() or " " in value:
        raise WireFormatError(f"{field} {value!r} contains whitespace or an unprintable character: an id is also "
                              "a line of the broker's ACL, which splits on whitespace")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(f"{field} is not valid UTF-8 (lone surrogate)") from None
    return raw


class FrameWriter:
    """Appends fields; integers are range-checked so an encoder never wraps silently."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, data: bytes) -> None:
        self.parts.append(bytes(data))

    def uint(self, value: int, width: int, field: str) -> None:
        packer = {1: _U8, 2: _U16, 4: _U32, 8: _U64}[width]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
            raise WireFormatError(f"{field} must be an integer in [0, 2^{8 * width}), got {value!r}")
        self.parts.append(packer.pack(value))

    def fixed(self, data: bytes, size: int, field: str) -> None:
        if len(data) != size:
            raise WireFormatError(f"{field} must be {size} bytes, got {len(data)}")
        self.parts.append(bytes(data))

    def ident(self, value: str, field: str, max_bytes: int) -> None:
        raw = check_id(value, field, max_bytes)
        self.uint(len(raw), 1, f"{field} length")
        self.parts.append(raw)

    def blob(self, data: bytes, field: str, limit: int, limit_name: str) -> None:
        if len(data) > limit:
            raise WireFormatError(f"{field} has {len(data)} bytes, limit is {limit} ({limit_name})")
        self.uint(len(data), 4, f"{field} length")
        self.parts.append(bytes(data))

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class FrameReader:
    """Reads fields off a buffer; every failure names the field, and nothing is allocated past a bound."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireFormatError(f"{what} must be bytes, got {type(data).__name__}")
        self.data = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> memoryview:
        if n > self.remaining:
            raise WireFormatError(f"{self.what} truncated in {field}: needs {n} bytes at offset {self.pos}, "
                                  f"{self.remaining} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, width: int, field: str) -> int:
        unpacker = {1: _U8, 2: _U16, 4: _U32, 8: _U64}[width]
        return unpacker.unpack(self.take(width, field))[0]

    def fixed(self, size: int, field: str) -> bytes:
        return bytes(self.take(size, field))

    def ident(self, field: str, max_bytes: int) -> str:
        n = self.uint(1, f"{field} length")
        if not 1 <= n <= max_bytes:
            raise WireFormatError(f"{self.what}: {field} declares {n} bytes, must be 1..{max_bytes}")
        raw = bytes(self.take(n, field))
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError(f"{self.what}: {field} is not valid UTF-8") from None
        check_id(value, f"{self.what}: {field}", max_bytes)
        return value

    def blob(self, field: str, limit: int, limit_name: str) -> bytes:
        n = self.uint(4, f"{field} length")
        if n > limit:
            raise WireFormatError(f"{self.what}: {field} declares {n} bytes, limit is {limit} ({limit_name})")
        return bytes(self.take(n, field))

    def magic(self, expected: bytes, field: str, hint: str) -> None:
        got = bytes(self.take(len(expected), field))
        if got != expected:
            raise WireFormatError(f"{self.what}: {field} is {got!r}, expected {expected!r} ({hint})")

    def finish(self) -> None:
        if self.remaining:
            raise WireFormatError(f"{self.what}: {self.remaining} trailing bytes after the last field")
