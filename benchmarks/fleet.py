"""The fleet simulator at scale: ``simulate`` with 100 and 1000 devices on this machine's 2 cores.

For each broker (Mosquitto, and the embedded amqtt) and fleet size n: one ``simulate`` run of the
digits MLP (64-64-10, 4,810 parameters; above 500 devices on digits plus a jittered copy, since the
partition gives every device at least 2 samples) with active-secure SecAgg+ and distributed DP (Skellam,
ε = 10 over the run), every device invited, no faults, 2 worker processes. Reported per round:

* round time: the service's own figure, from the signed plan to the published model; wall: the
  whole ``simulate`` call (bundle, fleet set-up, every device connecting, the round, shutdown);
* peak RSS: the engine process (aggregator service, evaluation) plus every worker (the devices),
  each its own ``ru_maxrss``; the broker is not included;
* messages and bytes through the aggregator's connection (first transmissions), and the message
  rate that makes (messages / round time);
* the floor, in the same run and through the same broker: raw paho QoS 1 publishes of 256 B from
  100 connections to one subscriber on one ``MqttLoop``, in messages per second.

    python benchmarks/fleet.py [--n 100 1000] [--brokers mosquitto embedded] [--rounds 1] [--floor-repeats 3]
                                [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.simulator import simulate  # noqa: E402
from aggregator.simulator.scenario import Scenario  # noqa: E402
from edge_sdk.transport.event_loop import MqttLoop  # noqa: E402
from edge_sdk.transport.mqtt import MqttSettings, MqttTransport  # noqa: E402

FLOOR_PUBLISHERS = 100
FLOOR_MESSAGES = 50  # each
FLOOR_BYTES = 256
FLOOR_WAVE = 5  # messages per publisher per wave


def _transport_benchmark():
    spec = importlib.util.spec_from_file_location("transport_benchmark", ROOT / "benchmarks" / "transport.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def message_floor(url: str, repeats: int) -> float:
    """Median messages per second: raw QoS 1 publishes from 100 connections to one subscriber."""
    loop = MqttLoop()
    subscriber = MqttTransport(MqttSettings(url, "floor-subscriber", persistent_session=False), loop)
    subscriber.subscribe("fleetlearn-floor/+")
    publishers = [MqttTransport(MqttSettings(url, f"floor-{i}", persistent_session=False), loop)
                  for i in range(FLOOR_PUBLISHERS)]
    assert loop.run(60, until=lambda: subscriber.ready and all(p.connected for p in publishers))
    payload = os.urandom(FLOOR_BYTES)
    rates = []
    for _ in range(repeats):
        received = 0
        start = time.perf_counter()
        for wave in range(0, FLOOR_MESSAGES, FLOOR_WAVE):  # waves below the broker's 1000-message client queue
            for _ in range(FLOOR_WAVE):
                for i, publisher in enumerate(publishers):
                    publisher.publish(f"fleetlearn-floor/{i}", payload)
            expected = FLOOR_PUBLISHERS * (wave + FLOOR_WAVE)
            while received < expected:
                got = subscriber.poll(5)
                if not got:
                    raise RuntimeError(f"the broker delivered {received} of {expected} floor messages")
                received += len(got)
        rates.append(received / (time.perf_counter() - start))
    for transport in (*publishers, subscriber):
        transport.close(timeout=0.5)
    loop.close()
    return statistics.median(rates)


def digits_bundle(directory: Path) -> Path:
    from aggregator import model_zoo
    from aggregator.compiler import compile_model

    bundle = directory / "digits-mlp"
    compile_model(model_zoo.mlp((64, 64, 10), seed=0), bundle, loss="cross_entropy", optimizer="sgd")
    return bundle


def digits_twice(directory: Path) -> Path:
    """Digits and a jittered copy (3,594 samples): 1,000 devices need 2 training samples each, digits has 1,797."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    jitter = np.random.default_rng(0).normal(0, 0.02, x.shape).astype(np.float32)
    path = directory / "digits-twice.npz"
    np.savez(path, x=np.concatenate([x, np.clip(x + jitter, 0, 1)]), y=np.concatenate([d.target, d.target]))
    return path


def run_case(url: str, n: int, rounds: int, bundle: Path, out: Path) -> dict:
    dataset = "digits" if n <= 500 else str(digits_twice(out.parent))
    scenario = Scenario(devices=n, rounds=rounds, bundle=bundle, epsilon=10.0, partition="iid", lr=0.1,
                        broker=url, workers=2, seed=0, dataset=dataset)
    started = time.monotonic()
    report = simulate(scenario, out)
    completed = [r for r in report.rounds if r.status == "completed"]
    seconds = [r.seconds for r in completed]
    return {"n": n, "completed": len(completed), "rounds": len(report.rounds),
            "round_s": statistics.median(seconds) if seconds else float("nan"),
            "messages": statistics.median(r.messages for r in completed) if completed else 0,
            "bytes": statistics.median(r.bytes_up + r.bytes_down for r in completed) if completed else 0,
            "rss_engine": report.timings["peak_rss_mb_engine"], "rss_workers": report.timings["peak_rss_mb_workers"],
            "rss_total": report.timings["peak_rss_mb_total"], "setup_s": report.timings["setup_seconds"],
            "wall_s": time.monotonic() - started,
            "aborted": [r.abort_reason for r in report.rounds if r.status != "completed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--brokers", nargs="+", choices=("mosquitto", "embedded"), default=["mosquitto", "embedded"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--floor-repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the runs (reports, logs/aggregator.log, logs/worker-*.log) under this directory")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        bundle = digits_bundle(root)
        for kind in args.brokers:
            if kind == "mosquitto":
                (root / "mosquitto").mkdir()
                process, port = _transport_benchmark().start_mosquitto(root / "mosquitto", "set_tcp_nodelay true\n")
                url, stop = f"mqtt://127.0.0.1:{port}", (lambda p=process: (p.terminate(), p.wait(10)))
            else:
                from aggregator.broker.embedded import EmbeddedBroker

                broker = EmbeddedBroker().start()
                url, stop = broker.url, broker.stop
            try:
                floor = message_floor(url, args.floor_repeats)
                for n in args.n:
                    case = run_case(url, n, args.rounds, bundle, root / f"runs-{kind}")
                    case.update(broker=kind, floor=floor)
                    rows.append(case)
                    print(f"  {kind} n={n}: {case}", file=sys.stderr)
            finally:
                stop()
    print("digits MLP (4,810 parameters), active-secure SecAgg+, distributed DP, 2 workers, medians over rounds")
    print(f"{'broker':>10}{'n':>6}{'done':>6}{'round s':>9}{'wall s':>8}{'RSS MB':>8}{'engine':>8}{'workers':>9}"
          f"{'msgs':>7}{'kB':>8}{'msg/s':>8}{'floor/s':>9}{'rate/floor':>11}")
    for r in rows:
        rate = r["messages"] / r["round_s"] if r["completed"] else float("nan")
        print(f"{r['broker']:>10}{r['n']:>6}{r['completed']:>3}/{r['rounds']:<2}{r['round_s']:>9.2f}{r['wall_s']:>8.0f}"
              f"{r['rss_total']:>8.0f}{r['rss_engine']:>8.0f}{r['rss_workers']:>9.0f}{r['messages']:>7.0f}"
              f"{r['bytes'] / 1e3:>8.0f}{rate:>8.0f}{r['floor']:>9.0f}{rate / r['floor']:>11.3f}")


if __name__ == "__main__":
    main()
