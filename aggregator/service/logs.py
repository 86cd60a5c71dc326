"""Structured log lines with round, session and device fields, and rate-limited rejections.

Why structured: an operator greps a fleet's logs by round or device, so those are fields, not
words inside a message. Why rate-limited: an outsider can flood the uplink with forged or replayed
messages; each is refused (and counted in the metrics), but logging every one would let the flood
fill the disk. The first few of each reason are logged, then one summary per window.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONTEXT_FIELDS = ("fleet", "round", "session", "stage", "device", "kind", "reason", "model_version", "contributors",
                  "accuracy", "loss", "seconds", "cpu_seconds")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the context fields that are set."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value.hex() if isinstance(value, bytes) else value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, sort_keys=False, default=str)


def configure_json_logging(level: int = logging.INFO, stream: Any = None) -> logging.Handler:
    """Route the root logger to one JSON-lines handler (the service's stderr, for journald)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class ContextLogger(logging.LoggerAdapter):
    """A logger with fixed context fields (fleet, round, session); ``bind`` adds more."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

    def bind(self, **fields: Any) -> ContextLogger:
        return ContextLogger(self.logger, {**(self.extra or {}), **fields})


@dataclass
class RejectionLog:
    """Logs at most ``burst`` rejections per reason per ``window`` seconds, then one summary of the rest."""

    logger: ContextLogger
    burst: int = 5
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # reason -> (start, logged, dropped)

    def reject(self, reason: str, detail: str, **fields: Any) -> bool:
        """Log one rejection unless its reason is over the limit; True if it was logged."""
        now = self.clock()
        start, logged, suppressed = self._windows.get(reason, (now, 0, 0))
        if now - start >= self.window:
            if suppressed:
                self.logger.warning("%d more rejections (%s) in the last %.0f s were not logged",
                                    suppressed, reason, now - start, extra={"reason": reason})
            start, logged, suppressed = now, 0, 0
        if logged < self.burst:
            self.logger.warning("rejected (%s): %s", reason, detail, extra=fields)
            self._windows[reason] = (start, logged + 1, suppressed)
            return True
        self._windows[reason] = (start, logged, suppressed + 1)
        return False
