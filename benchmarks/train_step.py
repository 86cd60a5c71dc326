"""Median milliseconds per training step: fleetlearn (plain onnxruntime) vs PyTorch CPU vs numpy.

Models (batch 32): the MLP 784-128-10 (SGD and Adam) and the CNN 1x28x28 -> conv8 -> pool -> conv16
-> pool -> fc10 (SGD), each at 1 and 2 threads. All three implementations start from the same
weights (the model zoo's initializers). The baselines are measured in the same run, interleaved
with fleetlearn, so a busy machine shifts every column alike. Also: peak RSS (VmHWM) of a fresh
process that imports edge_sdk and trains the MLP, next to a process that only imports numpy and
onnxruntime.

Targets at 1 thread: MLP <= 0.5x PyTorch, CNN <= 1.0x PyTorch, MLP RSS <= 80 MB.

Real models (``_torch_models``: resnet18, squeezenet1_1, mobilenet_v3_small full and head-only, a GRU
keyword spotter; batch 32, 3x32x32 images): exported with ``aggregator.export.torch_to_onnx`` from
``model.train()`` (BatchNorm with batch statistics, as PyTorch trains) or, head-only, from
``model.eval()`` with only the head trainable, and timed against PyTorch training the same tensors
from the same weights. Peak RSS of each side comes from its own fresh process (open + 6 steps), so
neither pollutes the other's high-water mark.

    python benchmarks/train_step.py [--quick] [--profile DIR] [--only mlp,cnn,resnet18,...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator import model_zoo  # noqa: E402
from aggregator.compiler import compile_model  # noqa: E402
from edge_sdk.training.bundle import load_bundle  # noqa: E402
from edge_sdk.training.session import ModelSession, SessionOptions  # noqa: E402
from edge_sdk.training.state import TrainingState  # noqa: E402

BATCH = 32
LR = 0.01
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

try:
    import torch
except ImportError:  # the baseline is optional; torch stays out of the required dependencies
    torch = None


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, rounds: int = 5) -> dict[str, float]:
    """Median ms per call of each step function, run in alternating rounds so load drifts hit all alike."""
    times: dict[str, list[int]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(5):  # warm-up: first-call allocations, kernel selection, thread-pool start
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter_ns()
                step()
                times[name].append(time.perf_counter_ns() - t0)
    return {name: statistics.median(t) / 1e6 for name, t in times.items()}


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


# --------------------------------------------------------------------------- numpy references


def _softmax_ce_grad(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    p = exp / exp.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y]).mean())
    p[np.arange(n), y] -= 1.0
    return loss, p / n


class NumpyOptimizer:
    """SGD or Adam applied in place to a dict of numpy parameters."""

    def __init__(self, params: dict[str, np.ndarray], kind: str, lr: float) -> None:
        self.params, self.kind, self.lr, self.t = params, kind, lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            if self.kind == "sgd":
                self.params[k] -= self.lr * g
                continue
            b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            self.params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + eps)


def numpy_mlp_step(p: dict[str, np.ndarray], opt: NumpyOptimizer, x: np.ndarray, y: np.ndarray) -> float:
    w1, b1, w2, b2 = p["layers.0.weight"], p["layers.0.bias"], p["layers.2.weight"], p["layers.2.bias"]
    pre = x @ w1.T + b1
    h = np.maximum(pre, 0)
    loss, dl = _softmax_ce_grad(h @ w2.T + b2, y)
    dh = dl @ w2
    dh[pre <= 0] = 0
    opt.step(
        {
            "layers.0.weight": dh.T @ x,
            "layers.0.bias": dh.sum(0),
            "layers.2.weight": dl.T @ h,
            "layers.2.bias": dl.sum(0),
        }
    )
    return loss


def _im2col(x: np.ndarray, k: int) -> np.ndarray:
    """[N, C, H, W] -> [N*H'*W', C*k*k] for a stride-1, unpadded k x k convolution."""
    n, c, h, w = x.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # N C H' W' k k
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * (h - k + 1) * (w - k + 1), c * k * k)


def _conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, _, h, wd = x.shape
    f, _, k, _ = w.shape
    cols = _im2col(x, k)
    out = cols @ w.reshape(f, -1).T + b
    return out.reshape(n, h - k + 1, wd - k + 1, f).transpose(0, 3, 1, 2), cols


def _conv_backward(dout, cols, x_shape, w, need_dx):
    n, c, h, wd = x_shape
    f, _, k, _ = w.shape
    d = dout.transpose(0, 2, 3, 1).reshape(-1, f)
    dw = (d.T @ cols).reshape(w.shape)
    db = d.sum(0)
    if not need_dx:
        return dw, db, None
    dcols = (d @ w.reshape(f, -1)).reshape(n, h - k + 1, wd - k + 1, c, k, k)
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i : i + h - k + 1, j : j + wd - k + 1] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dw, db, dx


def _maxpool_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, h, w = x.shape
    crop = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
    out = crop.max(axis=(3, 5))
    return out, crop == out[:, :, :, None, :, None]


def _maxpool_backward(dout: np.ndarray, mask: np.ndarray, x_shape) -> np.ndarray:
    dx = np.zeros(x_shape, dtype=dout.dtype)
    n, c, h, w = x_shape
    dx[:, :, : h // 2 * 2, : w // 2 * 2] = (mask * dout[:, :, :, None, :, None]).reshape(
        n, c, h // 2 * 2, w // 2 * 2
    )
    return dx


def numpy_cnn_step(p: dict[str, np.ndarray], opt: NumpyOptimizer, x: np.ndarray, y: np.ndarray) -> float:
    c1, cols1 = _conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    r1 = np.maximum(c1, 0)
    p1, m1 = _maxpool_forward(r1)
    c2, cols2 = _conv_forward(p1, p["conv2.weight"], p["conv2.bias"])
    r2 = np.maximum(c2, 0)
    p2, m2 = _maxpool_forward(r2)
    flat = p2.reshape(len(x), -1)
    loss, dl = _softmax_ce_grad(flat @ p["fc.weight"].T + p["fc.bias"], y)
    grads = {"fc.weight": dl.T @ flat, "fc.bias": dl.sum(0)}
    d = _maxpool_backward((dl @ p["fc.weight"]).reshape(p2.shape), m2, r2.shape) * (c2 > 0)
    grads["conv2.weight"], grads["conv2.bias"], d = _conv_backward(d, cols2, p1.shape, p["conv2.weight"], True)
    d = _maxpool_backward(d, m1, r1.shape) * (c1 > 0)
    grads["conv1.weight"], grads["conv1.bias"], _ = _conv_backward(d, cols1, x.shape, p["conv1.weight"], False)
    opt.step(grads)
    return loss


# --------------------------------------------------------------------------- PyTorch baseline


def torch_module(kind: str, w: dict[str, np.ndarray]):
    nn = torch.nn
    if kind == "mlp":
        module = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        names = {"0.weight": "layers.0.weight", "0.bias": "layers.0.bias", "2.weight": "layers.2.weight",
                 "2.bias": "layers.2.bias"}
    else:
        module = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(400, 10),
        )
        names = {"0.weight": "conv1.weight", "0.bias": "conv1.bias", "3.weight": "conv2.weight",
                 "3.bias": "conv2.bias", "7.weight": "fc.weight", "7.bias": "fc.bias"}
    module.load_state_dict({k: torch.from_numpy(w[v].copy()) for k, v in names.items()})
    return module


def torch_step_fn(kind: str, optimizer: str, w, x: np.ndarray, y: np.ndarray):
    module = torch_module(kind, w)
    if optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=LR)
    else:
        opt = torch.optim.Adam(module.parameters(), lr=LR, betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(tx), ty)
        loss.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------- peak RSS

PEAK_RSS = """
def peak_rss_kb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (here a process
    # with torch loaded), so a child would report the parent's peak.
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

RSS_SCRIPT = PEAK_RSS + """
import sys
import numpy as np
from edge_sdk.training.session import ModelSession
from edge_sdk.training.state import TrainingState
session = ModelSession.open(sys.argv[1], threads=1)
state = TrainingState(session)
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 784), dtype=np.float32)
y = rng.integers(0, 10, 32).astype(np.int64)
for _ in range(200):
    state.train_step(x, y, 0.01)
host = [m for m in ("onnx", "torch", "scipy", "sklearn", "aggregator") if m in sys.modules]
print(peak_rss_kb(), ",".join(host))
"""

FLOOR_SCRIPT = PEAK_RSS + """
import numpy, onnxruntime
print(peak_rss_kb())
"""


def peak_rss_mb(script: str, *args: str) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    return int(out[0]) / 1024, (out[1] if len(out) > 1 else "")


# --------------------------------------------------------------------------- main


def numpy_threads(threads: int):
    """Limit numpy's BLAS pool like the others (threadpoolctl comes with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def measure(kind, optimizer, threads, path, w, repeats, rng, profile_dir):
    shape = (BATCH, 784) if kind == "mlp" else (BATCH, 1, 28, 28)
    x = rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int64)
    profile = None
    if profile_dir:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        profile = str(Path(profile_dir) / f"{kind}-{optimizer}-t{threads}")
    session = ModelSession(load_bundle(path), SessionOptions(threads=threads, profile_prefix=profile))
    state = TrainingState(session)
    steps = {"fleetlearn": functools.partial(state.train_step, x, y, LR)}
    if torch is not None:
        torch.set_num_threads(threads)
        steps["pytorch"] = torch_step_fn(kind, optimizer, w, x, y)
    params = {k: v.copy() for k, v in w.items() if not k.startswith("/")}
    reference = numpy_mlp_step if kind == "mlp" else numpy_cnn_step
    steps["numpy"] = functools.partial(reference, params, NumpyOptimizer(params, optimizer, LR), x, y)
    with numpy_threads(threads):
        medians = interleaved_medians(steps, repeats)
    if profile:
        print(f"onnxruntime profile: {session.train_step.end_profiling()}")
    return kind, optimizer, threads, medians["fleetlearn"], medians.get("pytorch"), medians["numpy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--profile", metavar="DIR", help="write onnxruntime profiles of the fleetlearn steps")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    scale = 0.2 if args.quick else 1.0
    if only is None or only & {"mlp", "cnn"}:
        small_models(scale, args.profile, only)
    if torch is not None and (only is None or only - {"mlp", "cnn"}):
        from _real_models import real_model_table  # needs torch

        real_model_table(scale, args.profile, only)


def small_models(scale: float, profile: str | None, only: set[str] | None) -> None:
    rng = np.random.default_rng(0)
    cases = [c for c in (("mlp", "sgd"), ("mlp", "adam"), ("cnn", "sgd")) if only is None or c[0] in only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for kind, optimizer in cases:
            model = model_zoo.mlp((784, 128, 10), seed=0) if kind == "mlp" else model_zoo.cnn(seed=0)
            out = Path(tmp) / f"{kind}-{optimizer}"
            compile_model(model, out, loss="cross_entropy", optimizer=optimizer,
                          optimizer_params=ADAM if optimizer == "adam" else None)
            bundles[kind, optimizer] = (out, weights(model))
        for kind, optimizer in cases:
            path, w = bundles[kind, optimizer]
            repeats = max(20, int((400 if kind == "mlp" else 100) * scale))
            for threads in (1, 2):
                rows.append(measure(kind, optimizer, threads, path, w, repeats, rng, profile))
        rss = peak_rss_mb(RSS_SCRIPT, str(bundles["mlp", "sgd"][0])) if ("mlp", "sgd") in bundles else None
        floor, _ = peak_rss_mb(FLOOR_SCRIPT)

    print(f"\nmedian ms per training step, batch {BATCH} (torch {torch.__version__ if torch else 'not installed'}, "
          f"{os.cpu_count()} cpus)")
    print(f"{'model':<5} {'opt':<5} {'thr':>3} {'fleetlearn':>11} {'pytorch':>9} {'numpy':>8} "
          f"{'fl/torch':>9} {'fl/numpy':>9}  target")
    targets = {"mlp": 0.5, "cnn": 1.0}
    for kind, optimizer, threads, fleet, torch_ms, numpy_ms in rows:
        ratio = f"{fleet / torch_ms:9.2f}" if torch_ms else f"{'-':>9}"
        target = f"<= {targets[kind]}x" if threads == 1 else ""
        torch_cell = f"{torch_ms:9.3f}" if torch_ms else f"{'-':>9}"
        print(f"{kind:<5} {optimizer:<5} {threads:>3} {fleet:11.3f} {torch_cell} {numpy_ms:8.3f} "
              f"{ratio} {fleet / numpy_ms:9.2f}  {target}")
    if rss is not None:
        print(f"\npeak RSS, MLP 784-128-10 SGD, 200 steps in a fresh process: {rss[0]:.1f} MB (target <= 80 MB); "
              f"baseline `import numpy, onnxruntime`: {floor:.1f} MB; host packages loaded: {rss[1] or 'none'}")


if __name__ == "__main__":
    main()
