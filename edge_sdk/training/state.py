"""One device's parameters and optimiser state, stepped through a shared ``ModelSession``.

Why a ring of buffer sets: a train step reads parameters and optimiser state and writes their new
values. Binding the outputs to a spare, preallocated set and then making that set current costs
nothing per step (no copies, no allocations, no re-binding): one IOBinding per (current -> next)
pair is built once, and a step only rebinds x and y when the caller passes a different buffer.

Why three parameter sets: a step is committed only when its loss is finite. When a step's loss is
NaN/inf because the *previous* update overflowed, the current set already holds inf; the set before
it is still intact (the failing step wrote into the third), so the device can roll back to the last
finite parameters without ever copying on the happy path.

Why only two optimiser-state sets: Adam's m and v are twice the parameters' size, so a third copy
of them is most of a large model's memory (resnet18: 90 MB of 540). Two are what a NaN batch needs
(the failing step wrote into the spare set; the current one is untouched). An overflow rollback
cannot restore the moments of the step before the overflow, so it resets them (see
``_handle_non_finite``), which restarts Adam's bias correction like ``reset_optimizer_state``.
onnxruntime may read an input while it writes any output, so no set is ever both read and written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from edge_sdk.errors import FleetlearnError
from edge_sdk.training.bundle import BundleError
from edge_sdk.training.session import ModelSession

log = logging.getLogger(__name__)

RING_SIZE = 3  # parameter and running-statistic sets
STATE_RING_SIZE = 2  # optimiser-state sets


class ParameterError(BundleError, ValueError):
    """Parameters handed to a device do not match the bundle's trainable parameters."""


class NonFiniteLossError(FleetlearnError, ArithmeticError):
    """A train step produced a NaN or infinite loss; training stopped and nothing was committed.

    ``step`` is the 1-based number of the failing step since the state was created (or its
    optimiser reset); the loop adds ``epoch`` and ``batch``.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        loss: float,
        rolled_back: bool = False,
        epoch: int | None = None,
        batch: int | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.rolled_back = rolled_back
        self.epoch = epoch
        self.batch = batch


def _all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())


class TrainingState:
    """Parameters + optimiser state of one device, in preallocated numpy buffers shared with onnxruntime.

    Running statistics of training-mode BatchNormalization (the manifest's ``buffers``) ride in the
    same ring, so a rollback restores them with the parameters; they are not optimiser state.

    Not thread-safe by itself (one device, one thread); many states may share one session.
    """

    def __init__(self, session: ModelSession, params: Mapping[str, np.ndarray] | None = None) -> None:
        self.session = session
        manifest = session.manifest
        self._param_specs = manifest.trainable
        self._state_specs = manifest.state
        self._buffer_specs = manifest.buffers
        self._x_name, self._y_name = manifest.train_step_inputs[:2]
        self._x_dtype = np.dtype(manifest.x.dtype)
        self._y_dtype = np.dtype(manifest.y.dtype)
        param_dtype = np.dtype(self._param_specs[0].dtype) if self._param_specs else np.dtype(np.float32)

        # Scalars updated in place before every run; bound once, read by onnxruntime from these buffers.
        self._lr = np.zeros((), dtype=param_dtype)
        self._step_no = np.zeros((), dtype=np.int64)
        loss_dtype = np.dtype(manifest.output.dtype) if manifest.output.dtype != "int64" else param_dtype
        self._loss = np.zeros((), dtype=loss_dtype)

        self._params: list[dict[str, np.ndarray]] = [
            {p.name: np.zeros(p.shape, dtype=p.dtype) for p in self._param_specs} for _ in range(RING_SIZE)
        ]
        self._opt: list[dict[str, np.ndarray]] = [
            {s.name: np.zeros(s.shape, dtype=s.dtype) for s in self._state_specs} for _ in range(STATE_RING_SIZE)
        ]
        self._stats: list[dict[str, np.ndarray]] = [
            {b.name: np.zeros(b.shape, dtype=b.dtype) for b in self._buffer_specs} for _ in range(RING_SIZE)
        ]
        self._stat_values = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in st.items()} for st in self._stats]
        # OrtValues view the numpy buffers (CPU, zero-copy); keep them alive as long as the bindings.
        bound = {p.name: p.bound_shape for p in self._param_specs}
        self._param_values = [
            {n: ort.OrtValue.ortvalue_from_numpy(a.reshape(bound[n])) for n, a in st.items()} for st in self._params
        ]
        self._opt_values = [{n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in st.items()} for st in self._opt]
        self._lr_value = ort.OrtValue.ortvalue_from_numpy(self._lr)
        self._step_value = ort.OrtValue.ortvalue_from_numpy(self._step_no)
        self._loss_value = ort.OrtValue.ortvalue_from_numpy(self._loss)
        # One IOBinding per (parameter set, state set) pair, built on first use; keyed like ``_current``.
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        # What each binding currently has bound as x and y: (data pointer, shape), to skip re-binding.
        self._bound_xy: dict[tuple[int, int], tuple[tuple[int, tuple[int, ...]], tuple[int, tuple[int, ...]]]] = {}
        # Arrays bound by pointer must outlive the binding's next run.
        self._xy_refs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

        self._current = 0  # parameter (and running-statistic) set
        self._current_opt = 0  # optimiser-state set
        self._steps = 0
        self._previous_valid = False  # whether the set before ``_current`` holds committed values
        initial = session.bundle.initial_params
        for b in self._buffer_specs:
            np.copyto(self._stats[0][b.name], initial[b.name])
        self.set_params(params if params is not None else initial)

    def _binding(self, key: tuple[int, int]) -> ort.IOBinding:
        """The binding that reads sets ``key`` = (parameters, state) and writes the next ones."""
        binding = self._bindings.get(key)
        if binding is not None:
            return binding
        manifest = self.session.manifest
        _, _, lr_name, step_name = manifest.train_step_inputs
        i, j = key
        src_params, dst_params = self._param_values[i], self._param_values[(i + 1) % RING_SIZE]
        src_opt, dst_opt = self._opt_values[j], self._opt_values[(j + 1) % STATE_RING_SIZE]
        binding = self.session.train_step.io_binding()
        binding.bind_ortvalue_input(lr_name, self._lr_value)
        binding.bind_ortvalue_input(step_name, self._step_value)
        for p in self._param_specs:
            binding.bind_ortvalue_input(p.input, src_params[p.name])
            binding.bind_ortvalue_output(p.output, dst_params[p.name])
        for s in self._state_specs:
            binding.bind_ortvalue_input(s.input, src_opt[s.name])
            binding.bind_ortvalue_output(s.output, dst_opt[s.name])
        for b in self._buffer_specs:
            binding.bind_ortvalue_input(b.input, self._stat_values[i][b.name])
            binding.bind_ortvalue_output(b.output, self._stat_values[(i + 1) % RING_SIZE][b.name])
        binding.bind_ortvalue_output(manifest.loss_output, self._loss_value)
        self._bindings[key] = binding
        return binding

    # ----------------------------------------------------------------- parameters

    @property
    def steps(self) -> int:
        """Committed train steps since creation or the last ``reset_optimizer_state``."""
        return self._steps

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._param_specs)

    def get_params(self, include_running_stats: bool | None = None) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters, keyed by ONNX initializer name: the federated update.

        ``include_running_stats`` adds BatchNormalization running statistics; None follows each
        buffer's manifest ``federated`` flag (off unless compiled with ``federate_running_stats``).
        """
        params = {name: array.copy() for name, array in self._params[self._current].items()}
        stats = self._stats[self._current]
        for b in self._buffer_specs:
            if b.federated if include_running_stats is None else include_running_stats:
                params[b.name] = stats[b.name].copy()
        return params

    def get_running_stats(self) -> dict[str, np.ndarray]:
        """Copies of the BatchNormalization running statistics (empty without training-mode BN)."""
        return {name: array.copy() for name, array in self._stats[self._current].items()}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Overwrite the trainable parameters (e.g. with a new global model); optimiser state is kept.

        Every trainable parameter must be given, with its exact shape and dtype: a silent cast or
        broadcast here would hide a model mismatch until the update is aggregated. Running statistics
        may be given too (a global model that federates them); those not given keep their values.
        """
        expected = {p.name: p for p in self._param_specs}
        optional = {b.name: b for b in self._buffer_specs if b.name in params}
        unknown = sorted(set(params) - set(expected) - set(optional))
        missing = sorted(set(expected) - set(params))
        if unknown or missing:
            raise ParameterError(
                f"parameters do not match the bundle: unknown {unknown}, missing {missing}; "
                f"expected exactly {sorted(expected)}"
            )
        for name, spec in {**expected, **optional}.items():
            value = np.asarray(params[name])
            if value.shape != spec.shape or value.dtype != np.dtype(spec.dtype):
                raise ParameterError(
                    f"parameter {name!r} is {value.dtype}{list(value.shape)}, "
                    f"the bundle expects {spec.dtype}{list(spec.shape)}"
                )
        current = self._params[self._current]
        for name in expected:
            np.copyto(current[name], params[name])
        for name in optional:
            np.copyto(self._stats[self._current][name], params[name])
        self._previous_valid = False

    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the optimiser state (momentum velocity, Adam m/v), keyed by state name.

        Values are torch.optim's (e.g. ``exp_avg_sq``), whatever scale the graph stores them at.
        """
        current = self._opt[self._current_opt]
        return {s.name: current[s.name] / current[s.name].dtype.type(s.scale) for s in self._state_specs}

    def reset_optimizer_state(self) -> None:
        """Zero the optimiser state and restart the step count (Adam's bias correction restarts too)."""
        for array in self._opt[self._current_opt].values():
            array.fill(0)
        self._steps = 0
        self._previous_valid = False

    # ----------------------------------------------------------------- training

    def _bind_xy(self, binding_index: tuple[int, int], x: np.ndarray, y: np.ndarray) -> ort.IOBinding:
        binding = self._binding(binding_index)
        key = ((x.ctypes.data, x.shape), (y.ctypes.data, y.shape))
        if self._bound_xy.get(binding_index) == key:
            return binding
        binding.bind_input(self._x_name, "cpu", 0, x.dtype.type, list(x.shape), x.ctypes.data)
        binding.bind_input(self._y_name, "cpu", 0, y.dtype.type, list(y.shape), y.ctypes.data)
        self._bound_xy[binding_index] = key
        self._xy_refs[binding_index] = (x, y)
        return binding

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """Run one optimiser step on a batch and commit it; returns the batch's mean loss.

        ``x`` and ``y`` must already have the bundle's dtypes (see ``data.prepare_dataset``); they
        are bound by pointer, so a caller that refills one buffer per batch pays no binding cost.
        On a NaN/inf loss nothing is committed and ``NonFiniteLossError`` is raised.
        """
        if x.dtype != self._x_dtype or y.dtype != self._y_dtype:
            raise ParameterError(
                f"batch dtypes are x {x.dtype}, y {y.dtype}; the bundle expects x {self._x_dtype}, "
                f"y {self._y_dtype} (use edge_sdk.training.data.prepare_dataset)"
            )
        if not (x.flags.c_contiguous and y.flags.c_contiguous):
            x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        binding = self._bind_xy((self._current, self._current_opt), x, y)
        self._lr[()] = lr
        self._step_no[()] = self._steps + 1
        self.session.train_step.run_with_iobinding(binding)
        loss = float(self._loss[()])
        if not math.isfinite(loss):
            self._handle_non_finite(loss)
        self._current = (self._current + 1) % RING_SIZE
        self._current_opt = (self._current_opt + 1) % STATE_RING_SIZE
        self._steps += 1
        self._previous_valid = True
        return loss

    def _handle_non_finite(self, loss: float) -> None:
        """Leave the newest finite parameters current, then raise."""
        failing_step = self._steps + 1
        rolled_back = False
        if not _all_finite(self._params[self._current]):
            previous = (self._current - 1) % RING_SIZE
            if self._previous_valid and _all_finite(self._params[previous]):
                self._current = previous
                self._steps -= 1
                self._previous_valid = False
                rolled_back = True
                if self._state_specs:  # the two state sets hold the overflowed step's moments and this one's
                    self.reset_optimizer_state()
        where = (
            f"parameters rolled back to before step {failing_step - 1}, whose update overflowed"
            + ("; optimiser state reset" if self._state_specs else "")
            if rolled_back
            else f"parameters are left as they were before step {failing_step}"
        )
        log.warning("train step %d gave loss %s; %s", failing_step, loss, where)
        raise NonFiniteLossError(
            f"loss is {loss} at step {failing_step}; {where}. Lower the learning rate or check x for NaN/inf",
            step=failing_step,
            loss=loss,
            rolled_back=rolled_back,
        )

    # ----------------------------------------------------------------- evaluation

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean loss and model output for one batch, with the current parameters."""
        manifest = self.session.manifest
        feed: dict[str, np.ndarray] = {manifest.x.name: x, manifest.y.name: y}
        current = self._params[self._current]
        for p in self._param_specs:
            feed[p.input] = current[p.name].reshape(p.bound_shape)
        for b in self._buffer_specs:
            feed[b.input] = self._stats[self._current][b.name]
        loss, output = self.session.evaluator.run([manifest.loss_output, manifest.eval_output], feed)
        return float(loss), output
