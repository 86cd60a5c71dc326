"""Federated anomaly detection on vibration sensors: an autoencoder trained only on normal windows.

Each device is a machine with an accelerometer. Its normal vibration is its shaft rotation (a
speed of its own, 20-30 Hz) and two harmonics, plus sensor noise. Faults are what a maintenance
engineer looks for: a bearing defect (a train of impulses at the outer-race defect frequency,
3.6x the shaft speed, each ringing at a structural resonance of 200-240 Hz) or a speed/mesh shift
(the fundamental moves by +40% and a new high harmonic appears). A device turns each 256-sample
window (1 kHz) into 64 log-magnitude spectrum bins.

The devices train a 64-16-64 autoencoder (``aggregator.model_zoo.mlp``, compiled with
``loss="mse"``: the target is the input) on their normal windows only, federated with SecAgg+ and
distributed DP over the in-memory round layer (``examples/inprocess_fleet.py``: the real round
machines and privacy pipeline, no broker). Afterwards the aggregator's held-out set of normal and
faulty windows, from machines that took no part, is scored by reconstruction error; the threshold
is the 99th percentile of the error on held-out normal windows, and the example prints the AUC,
precision and recall.

    python examples/anomaly_vibration.py [--devices 30] [--windows 100] [--rounds 8] [--epsilon 8]
        [--clip 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess_fleet import FleetSettings, federated_train  # noqa: E402

from aggregator import model_zoo  # noqa: E402
from aggregator.compiler import compile_model  # noqa: E402
from edge_sdk.training import ModelSession, TrainingState, prepare_dataset  # noqa: E402

RATE = 1000.0  # samples per second
WINDOW = 256
BINS = 64  # the spectrum's bins 1..64: 3.9 Hz to 250 Hz
T = np.arange(WINDOW) / RATE


def normal_windows(rng: np.random.Generator, count: int, shaft_hz: float) -> np.ndarray:
    """Shaft rotation and two harmonics at random phases and slightly varying amplitudes, plus noise."""
    f = shaft_hz * (1 + 0.01 * rng.standard_normal((count, 1)))
    signal = np.zeros((count, WINDOW))
    for harmonic, amplitude in ((1, 1.0), (2, 0.5), (3, 0.25)):
        phase = rng.uniform(0, 2 * np.pi, (count, 1))
        signal += amplitude * (1 + 0.1 * rng.standard_normal((count, 1))) * np.sin(2 * np.pi * harmonic * f * T + phase)
    return signal + 0.2 * rng.standard_normal((count, WINDOW))


def bearing_fault(rng: np.random.Generator, count: int, shaft_hz: float) -> np.ndarray:
    """Normal vibration plus impulses at the outer-race defect frequency (3.6x the shaft speed), each
    ringing at a resonance of 200-240 Hz (inside the 64 bins' 250 Hz band) and decaying in 5 ms."""
    out = normal_windows(rng, count, shaft_hz)
    period = 1.0 / (3.6 * shaft_hz)
    for i in range(count):
        start = rng.uniform(0, period)
        ring = rng.uniform(200, 240)
        for t0 in np.arange(start, T[-1], period):
            dt = T - t0
            hit = dt >= 0
            out[i, hit] += rng.uniform(1.0, 2.0) * np.exp(-dt[hit] / 0.005) * np.sin(2 * np.pi * ring * dt[hit])
    return out


def speed_shift(rng: np.random.Generator, count: int, shaft_hz: float) -> np.ndarray:
    """The fundamental 40% faster, and a mesh-like harmonic at 7x the original speed."""
    out = normal_windows(rng, count, 1.4 * shaft_hz)
    phase = rng.uniform(0, 2 * np.pi, (count, 1))
    return out + 0.4 * np.sin(2 * np.pi * 7 * shaft_hz * T + phase)


def features(windows: np.ndarray) -> np.ndarray:
    """64 log-magnitude spectrum bins of each Hann-windowed window: what a device would compute."""
    spectrum = np.abs(np.fft.rfft(windows * np.hanning(WINDOW), axis=1))[:, 1:BINS + 1]
    return (np.log1p(spectrum) / 3.0).astype(np.float32)


def reconstruction_error(state: TrainingState, x: np.ndarray) -> np.ndarray:
    _, output = state.evaluate_batch(x, x)
    return ((np.asarray(output) - x) ** 2).mean(axis=1)


def auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """The probability a random anomalous window scores above a random normal one (ties count half)."""
    greater = (anomalous[:, None] > normal[None, :]).mean()
    ties = (anomalous[:, None] == normal[None, :]).mean()
    return float(greater + 0.5 * ties)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--windows", type=int, default=100, help="normal training windows per device")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=8.0, help="target fleet epsilon over all rounds")
    parser.add_argument("--clip", type=float, default=0.3, help="L2 clip of one update (chosen by experiment)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    speeds = rng.uniform(20, 30, args.devices)
    held_out_speeds = rng.uniform(20, 30, 6)  # machines that never trained
    test_normal = features(np.concatenate([normal_windows(rng, 50, s) for s in held_out_speeds]))
    test_faulty = features(np.concatenate([f(rng, 25, s) for s in held_out_speeds for f in (bearing_fault,
                                                                                          speed_shift)]))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        compile_model(model_zoo.mlp((BINS, 16, BINS), seed=args.seed), bundle, loss="mse", optimizer="sgd")
        session = ModelSession.open(bundle, threads=1)
        state = TrainingState(session)
        data = {f"machine-{i:02d}": prepare_dataset(session.manifest, x, x)
                for i, x in enumerate(features(normal_windows(rng, args.windows, s)) for s in speeds)}
        before = auc(reconstruction_error(state, test_normal), reconstruction_error(state, test_faulty))
        print(f"{args.devices} machines x {args.windows} normal windows; autoencoder {BINS}-16-{BINS} "
              f"({sum(v.size for v in state.get_params().values())} parameters), MSE loss; AUC before training "
              f"{before:.3f}")

        def report(round_index: int, params: dict, epsilon: float) -> None:
            normal = reconstruction_error(state, test_normal)
            print(f"round {round_index:2d}: held-out normal MSE {normal.mean():.4f}, faulty MSE "
                  f"{reconstruction_error(state, test_faulty).mean():.4f}, fleet epsilon {epsilon:.2f}", flush=True)

        settings = FleetSettings(rounds=args.rounds, epsilon=args.epsilon, clip=args.clip, epochs=args.local_epochs,
                                 batch_size=16, lr=args.lr, seed=args.seed)
        result = federated_train(state, data, settings, report)
        normal, faulty = reconstruction_error(state, test_normal), reconstruction_error(state, test_faulty)
        threshold = float(np.quantile(normal, 0.99))
        flagged = faulty > threshold
        false_alarms = int((normal > threshold).sum())
        precision = flagged.sum() / max(1, flagged.sum() + false_alarms)
        recall = flagged.mean()
        print(f"RESULT auc={auc(normal, faulty):.3f} precision={precision:.3f} recall={recall:.3f} "
              f"threshold={threshold:.4f} epsilon={result.epsilon:.2f} (held out: {len(normal)} normal, "
              f"{len(faulty)} faulty windows from {len(held_out_speeds)} machines that never trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
