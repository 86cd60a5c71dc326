"""The real-model rows of ``train_step.py``: ms per step and peak RSS, fleetlearn vs PyTorch.

Each case is exported once (``aggregator.export.torch_to_onnx``) and compiled; both sides then
train the same tensors from the same weights on the same batch. Times are interleaved medians in
this process; peak RSS (VmHWM) comes from one fresh process per side, model and thread count.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import _torch_models as torch_models
import numpy as np
import torch
from train_step import BATCH, LR, PEAK_RSS, ROOT, interleaved_medians

from aggregator.compiler import compile_model
from aggregator.compiler.errors import CompileError
from aggregator.export import torch_to_onnx
from edge_sdk.training.bundle import load_bundle
from edge_sdk.training.session import ModelSession, SessionOptions
from edge_sdk.training.state import TrainingState

STEPS_FOR_RSS = 6


@dataclass(frozen=True)
class Case:
    model: str
    optimizer: str
    head_only: bool = False
    repeats: int = 10

    @property
    def label(self) -> str:
        return f"{self.model}{' head' if self.head_only else ''}"


CASES = (
    Case("resnet18", "sgd"), Case("resnet18", "adam"), Case("resnet18", "sgd", head_only=True),
    Case("squeezenet1_1", "sgd"),
    Case("mobilenet_v3_small", "sgd"), Case("mobilenet_v3_small", "sgd", head_only=True),
    Case("gru_kws", "adam", repeats=60),
)


def torch_training(case: Case, threads: int):
    """(step function, batch x, labels y) for PyTorch training ``case`` as fleetlearn does."""
    torch.set_num_threads(threads)
    net, shape = torch_models.build(case.model)
    if case.head_only:
        net.eval()
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(torch_models.HEADS[case.model]))
    else:
        net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR) if case.optimizer == "sgd" else torch.optim.Adam(params, lr=LR)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, *shape)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int64)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(tx), ty).backward()
        opt.step()

    return step, x, y


def compile_case(case: Case, out: Path) -> None:
    net, shape = torch_models.build(case.model)
    net.eval() if case.head_only else net.train()
    proto = torch_to_onnx(net, torch.randn(2, *shape))
    trainable = [torch_models.HEADS[case.model]] if case.head_only else None
    compile_model(proto, out, loss="cross_entropy", optimizer=case.optimizer, trainable=trainable)


RSS_SCRIPT = PEAK_RSS + """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
side, model, optimizer, head, threads, bundle = sys.argv[2:8]
if side == "fleetlearn":
    import numpy as np
    from edge_sdk.training.session import ModelSession
    from edge_sdk.training.state import TrainingState
    state = TrainingState(ModelSession.open(bundle, threads=int(threads)))
    m = state.session.manifest
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, *m.x.shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int64)
    step = lambda: state.train_step(x, y, 0.01)
else:
    from _real_models import Case, torch_training
    step, _, _ = torch_training(Case(model, optimizer, head_only=head == "1"), int(threads))
for _ in range(int(sys.argv[8])):
    step()
print(peak_rss_kb())
"""


def peak_rss(side: str, case: Case, threads: int, bundle: Path) -> float:
    args = [side, case.model, case.optimizer, "1" if case.head_only else "0", str(threads), str(bundle),
            str(STEPS_FOR_RSS)]
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), *args], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    return int(out[-1]) / 1024


@dataclass
class Row:
    case: Case
    threads: int
    fleet_ms: float | None = None
    torch_ms: float | None = None
    fleet_mb: float | None = None
    torch_mb: float | None = None
    pending: str = ""


def measure(case: Case, bundle: Path, threads: int, scale: float, profile: str | None) -> Row:
    prefix = str(Path(profile) / f"{case.label.replace(' ', '-')}-t{threads}") if profile else None
    session = ModelSession(load_bundle(bundle), SessionOptions(threads=threads, profile_prefix=prefix))
    state = TrainingState(session)
    torch_step, x, y = torch_training(case, threads)
    steps = {"fleetlearn": functools.partial(state.train_step, x, y, LR), "pytorch": torch_step}
    medians = interleaved_medians(steps, max(5, int(case.repeats * scale)), rounds=min(5, case.repeats))
    if prefix:
        print(f"onnxruntime profile: {session.train_step.end_profiling()}")
    return Row(case, threads, medians["fleetlearn"], medians["pytorch"],
               peak_rss("fleetlearn", case, threads, bundle), peak_rss("pytorch", case, threads, bundle))


def real_model_table(scale: float, profile: str | None, only: set[str] | None) -> list[Row]:
    logging.getLogger("aggregator").setLevel(logging.ERROR)  # export warnings are not the benchmark's output
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if only is not None and case.model not in only:
                continue
            bundle = Path(tmp) / f"{case.label.replace(' ', '-')}-{case.optimizer}"
            try:
                compile_case(case, bundle)
            except CompileError as exc:
                rows += [Row(case, t, pending=str(exc).splitlines()[0][:70]) for t in (1, 2)]
                continue
            rows += [measure(case, bundle, threads, scale, profile) for threads in (1, 2)]
    print_table(rows)
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "    -"


def print_table(rows: list[Row]) -> None:
    print(f"\nreal models, batch {BATCH}: median ms per step and peak RSS (MB, fresh process, open + "
          f"{STEPS_FOR_RSS} steps); targets <= 1.0x PyTorch in both")
    print(f"{'model':<24} {'opt':<4} {'thr':>3} {'fl ms':>8} {'torch ms':>8} {'time':>6} "
          f"{'fl MB':>7} {'torch MB':>8} {'RSS':>6}")
    for r in rows:
        head = f"{r.case.label:<24} {r.case.optimizer:<4} {r.threads:>3}"
        if r.pending:
            print(f"{head} pending: {r.pending}")
            continue
        print(f"{head} {r.fleet_ms:8.1f} {r.torch_ms:8.1f} {_ratio(r.fleet_ms, r.torch_ms):>6} "
              f"{r.fleet_mb:7.0f} {r.torch_mb:8.0f} {_ratio(r.fleet_mb, r.torch_mb):>6}")
