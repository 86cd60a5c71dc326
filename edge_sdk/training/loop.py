"""The local training loop and evaluation a device runs between federated rounds.

Batches are gathered into one preallocated buffer pair, so the train step's x/y bindings stay put
for every full batch; only the last, partial batch is a (contiguous) view of a different shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.training.data import Dataset, epoch_order
from edge_sdk.training.state import NonFiniteLossError, TrainingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters; the same seed gives bitwise-identical parameters."""

    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr >= 0 and np.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr}")


@dataclass(frozen=True)
class Evaluation:
    """Mean loss over a dataset, and accuracy when the model is a classifier."""

    loss: float
    accuracy: float | None
    examples: int


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did: its mean training loss (over examples) and how long it took."""

    epoch: int
    steps: int
    train_loss: float
    seconds: float


def train_local(
    state: TrainingState,
    data: Dataset,
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> list[EpochReport]:
    """Train ``state`` in place for ``config.epochs`` epochs over ``data`` (the last partial batch is used).

    Raises ``NonFiniteLossError`` naming the epoch and step if a loss turns NaN/inf; the state keeps
    its last finite parameters.
    """
    n = len(data)
    batch = min(config.batch_size, n)
    x_buf = np.empty((batch, *data.x.shape[1:]), dtype=data.x.dtype)
    y_buf = np.empty((batch, *data.y.shape[1:]), dtype=data.y.dtype)
    rng = np.random.default_rng(config.seed) if config.shuffle else None
    batches_per_epoch = -(-n // batch)
    reports = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        order = epoch_order(n, rng)
        loss_sum = 0.0
        for b, start in enumerate(range(0, n, batch), start=1):
            index = order[start : start + batch]
            k = len(index)
            xb, yb = (x_buf, y_buf) if k == batch else (x_buf[:k], y_buf[:k])
            np.take(data.x, index, axis=0, out=xb)
            np.take(data.y, index, axis=0, out=yb)
            try:
                loss_sum += state.train_step(xb, yb, config.lr) * k
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"training diverged at epoch {epoch}, step {b} of {batches_per_epoch}: {exc}",
                    step=exc.step,
                    loss=exc.loss,
                    rolled_back=exc.rolled_back,
                    epoch=epoch,
                    batch=b,
                ) from exc
        report = EpochReport(
            epoch=epoch,
            steps=batches_per_epoch,
            train_loss=loss_sum / n,
            seconds=time.perf_counter() - started,
        )
        log.info("epoch %d: train loss %.6g in %.3fs", epoch, report.train_loss, report.seconds)
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return reports


def evaluate(state: TrainingState, data: Dataset, *, batch_size: int = 1024) -> Evaluation:
    """Mean loss over ``data`` (and accuracy for cross-entropy), in batches to bound memory."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    classify = state.session.manifest.loss == "cross_entropy"
    n = len(data)
    loss_sum = 0.0
    correct = 0
    for start in range(0, n, batch_size):
        xb = data.x[start : start + batch_size]
        yb = data.y[start : start + batch_size]
        loss, output = state.evaluate_batch(xb, yb)
        loss_sum += loss * len(xb)
        if classify:
            correct += int(np.count_nonzero(output.argmax(axis=-1) == yb))
    return Evaluation(loss=loss_sum / n, accuracy=correct / n if classify else None, examples=n)
