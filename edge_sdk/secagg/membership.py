"""Sets of devices on the wire: bitmaps over an ordered universe, and the enrolment directory's digest.

Why bitmaps: the roster and the survivor set each name a subset of devices every device already
knows (the enrolment directory, or the roster's members). Listing ids costs
about 9 bytes a device and made the downlink grow with n; a bitmap costs one bit. The universe is
always sorted by device id, so both sides number devices the same way. The directory digest in the
roster lets a device whose directory is out of date say so, instead of misreading the bitmap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np

from edge_sdk.secagg.errors import MessageFormatError

_DIRECTORY_DOMAIN = b"fleetlearn/secagg/v1/directory|"


class Directory(Mapping[str, bytes]):
    """The enrolment directory (device id -> Ed25519 identity key), with its order and digest computed once.

    A device checks every roster against the digest, and the simulator runs thousands of devices
    over one directory: computing both per round and per device would cost O(n^2).
    """

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = dict(keys)
        self.order: tuple[str, ...] = tuple(sorted(self._keys))
        h = hashlib.sha256(_DIRECTORY_DOMAIN)
        for device_id in self.order:
            raw = device_id.encode()
            h.update(len(raw).to_bytes(2, "big") + raw + self._keys[device_id])
        self.digest: bytes = h.digest()

    @classmethod
    def of(cls, keys: Mapping[str, bytes]) -> Directory:
        return keys if isinstance(keys, Directory) else cls(keys)

    def __getitem__(self, device_id: str) -> bytes:
        return self._keys[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Directory({len(self)} devices, digest {self.digest.hex()[:12]})"


def to_bitmap(universe: Sequence[str], subset: Collection[str]) -> bytes:
    """Bit i (little-endian within each byte) is set when ``universe[i]`` is in ``subset``."""
    chosen = set(subset)
    flags = np.fromiter((d in chosen for d in universe), dtype=bool, count=len(universe))
    if int(flags.sum()) != len(chosen):
        outside = sorted(chosen - set(universe))[:5]
        raise MessageFormatError(f"devices {outside} are not in the set the bitmap numbers")
    return np.packbits(flags, bitorder="little").tobytes()


def from_bitmap(universe: Sequence[str], bitmap: bytes, what: str) -> tuple[str, ...]:
    """The members a bitmap names, in universe order; wrong length or stray padding bits are errors."""
    expected = (len(universe) + 7) // 8
    if len(bitmap) != expected:
        raise MessageFormatError(
            f"{what} bitmap is {len(bitmap)} bytes, but numbers {len(universe)} devices ({expected} bytes)"
        )
    flags = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    if flags[len(universe):].any():
        raise MessageFormatError(f"{what} bitmap sets bits past its {len(universe)} devices")
    return tuple(universe[i] for i in np.flatnonzero(flags[: len(universe)]))
