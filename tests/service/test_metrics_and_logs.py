"""The metrics endpoint serves what the service counted; log lines carry their fields; rejections are capped."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

from aggregator.service.logs import ContextLogger, JsonLineFormatter, RejectionLog
from aggregator.service.metrics import ServiceMetrics


def test_the_http_endpoint_serves_the_counted_events():
    metrics = ServiceMetrics("digits")
    metrics.round_finished("completed", 1.5, participants=9)
    metrics.round_finished("aborted", 3.0, participants=0)
    metrics.dropped("SECAGG", 2)
    metrics.moved("in", 1000)
    metrics.set_epsilon(1.25)
    metrics.rejected("bad-signature")
    port = metrics.serve("127.0.0.1", 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'fleetlearn_rounds_total{fleet="digits",outcome="completed"} 1.0' in text
    assert 'fleetlearn_rounds_total{fleet="digits",outcome="aborted"} 1.0' in text
    assert 'fleetlearn_round_participants{fleet="digits"} 9.0' in text
    assert 'fleetlearn_dropouts_total{fleet="digits",stage="SECAGG"} 2.0' in text
    assert 'fleetlearn_bytes_total{direction="in",fleet="digits"} 1000.0' in text
    assert 'fleetlearn_epsilon_spent{fleet="digits"} 1.25' in text
    assert 'fleetlearn_rejections_total{fleet="digits",reason="bad-signature"} 1.0' in text


def capture() -> tuple[ContextLogger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger(f"test.service.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return ContextLogger(logger, {"fleet": "digits"}), stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_lines_are_json_with_round_session_and_device_fields():
    log, stream = capture()
    log.bind(round=3, session=b"\xab" * 4).info("stage %s entered", "SECAGG", extra={"device": "pi-7"})
    (line,) = lines(stream)
    assert line["message"] == "stage SECAGG entered"
    assert (line["fleet"], line["round"], line["session"], line["device"]) == ("digits", 3, "abababab", "pi-7")


def test_rejections_are_rate_limited_per_reason_with_a_summary():
    now = [0.0]
    log, stream = capture()
    limiter = RejectionLog(log, burst=3, window=10.0, clock=lambda: now[0])
    logged = [limiter.reject("bad-signature", f"message {i}", device=f"d{i}") for i in range(100)]
    assert logged.count(True) == 3
    assert limiter.reject("replay", "another reason is counted apart")
    now[0] = 11.0
    assert limiter.reject("bad-signature", "a new window")
    out = lines(stream)
    assert len(out) == 6
    assert out[4]["message"] == "97 more rejections (bad-signature) in the last 11 s were not logged"
    assert out[0]["device"] == "d0" and out[4]["reason"] == "bad-signature"
