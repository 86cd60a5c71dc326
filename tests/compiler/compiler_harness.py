"""Running compiled graphs in tests: onnxruntime, or the ONNX reference evaluator for float64 Conv.

onnxruntime's CPU provider has no float64 kernels for Conv, ConvTranspose or MaxUnpool, so the
float64 finite-difference checks of convolutional graphs run on ``onnx.reference.ReferenceEvaluator``
(float32 graphs always run on onnxruntime). The reference evaluator's own MaxUnpool ignores the
``output_shape`` input when it differs from the default size (it writes into a buffer of the default
size and raises IndexError), so it is replaced here by a direct implementation of the ONNX spec:
scatter each value to its flat index in a zero tensor of ``output_shape``. Its grouped
ConvTranspose slices the weight by output instead of input channels (wrong unless both counts are
equal, as in depthwise convs), so groups are split here and each runs through its group=1 code.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose

from aggregator.compiler import CompiledGraphs, compile_graphs

ORT_FLOAT64_MISSING = {
    "Conv", "ConvTranspose", "MaxUnpool", "MaxPool", "AveragePool", "GlobalAveragePool", "GRU", "LSTM",
    "Erf", "HardSigmoid", "HardSwish", "Gelu",
}


class MaxUnpool(OpRun):
    op_domain = ""

    def _run(self, X, indices, output_shape=None, kernel_shape=None, pads=None, strides=None):  # noqa: N803
        shape = tuple(int(d) for d in output_shape)
        out = np.zeros(int(np.prod(shape)), dtype=X.dtype)
        out[indices.ravel()] = X.ravel()
        return (out.reshape(shape),)


class Erf(OpRun):
    """The reference Erf rounds through float32 (``np.vectorize(erf, otypes="f")``), which float64 finite
    differences of Erf and Gelu graphs cannot use; this one keeps the input's precision."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRun):
    """The reference expands Gelu into its function body, whose constants are float32 (forward errors of
    ~5e-8 that float64 finite differences amplify to ~1e-2); this one is exact in the input's precision."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        approximate = self.approximate if approximate is None else approximate
        if approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        cdf = 0.5 * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / math.sqrt(2)))
        return ((x * cdf).astype(x.dtype),)


class ConvTranspose(_ReferenceConvTranspose):
    op_domain = ""

    def _run(self, X, W, B=None, group=None, **attrs):  # noqa: N803
        group = group or self.group or 1
        if group == 1:
            return super()._run(X, W, B, group=1, **attrs)
        c = X.shape[1] // group
        m = W.shape[1]
        parts = [
            super(ConvTranspose, self)._run(
                X[:, i * c:(i + 1) * c], W[i * c:(i + 1) * c], None if B is None else B[i * m:(i + 1) * m],
                group=1, **attrs,
            )[0]
            for i in range(group)
        ]
        return (np.concatenate(parts, axis=1).astype(X.dtype),)


class GraphRunner:
    """Runs one graph with named feeds and returns its outputs by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.output_names = [o.name for o in model.graph.output]
        double = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
        ops = {n.op_type for n in model.graph.node}
        if double and ops & ORT_FLOAT64_MISSING:
            self._ref = ReferenceEvaluator(model, new_ops=[MaxUnpool, ConvTranspose, Erf, Gelu])
            self._sess = None
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self._sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self._ref = None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        values = self._sess.run(None, feeds) if self._sess is not None else self._ref.run(None, feeds)
        return dict(zip(self.output_names, values, strict=True))


def assert_standard_graph(model: onnx.ModelProto) -> None:
    """The acceptance checks every generated graph must pass (except loading float64 Conv in ORT)."""
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {""}, f"non-standard op domains {domains}"
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


def assert_loads_in_onnxruntime(model: onnx.ModelProto) -> None:
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def make_batch(compiled: CompiledGraphs, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random x and labels/targets matching the manifest, in the manifest's dtype."""
    rng = np.random.default_rng(seed)
    m = compiled.manifest
    x = rng.standard_normal((n, *m.x.shape[1:])).astype(m.x.dtype)
    if m.loss == "cross_entropy":
        y = rng.integers(0, m.output.shape[1], size=n).astype(np.int64)
    else:
        y = rng.standard_normal((n, *m.output.shape[1:])).astype(m.y.dtype)
    return x, y


def zero_state(compiled: CompiledGraphs) -> dict[str, np.ndarray]:
    return {s.input: np.zeros(s.shape, dtype=s.dtype) for s in compiled.manifest.state}


def param_feeds(compiled: CompiledGraphs, params) -> dict[str, np.ndarray]:
    """The trainable parameters under their graph input names, in the shape the graphs carry them."""
    return {p.input: params[p.name].reshape(p.bound_shape) for p in compiled.manifest.trainable}


def train_step(compiled, runner, params, x, y, lr, step=1, state=None) -> dict[str, np.ndarray]:
    m = compiled.manifest
    lr = np.asarray(lr, dtype=m.output.dtype)  # the parameters' dtype (x may hold int64 token ids)
    feeds = {"x": x, "y": y, "lr": lr, "step": np.asarray(step, dtype=np.int64)}
    feeds.update(param_feeds(compiled, params))
    feeds.update(state if state is not None else zero_state(compiled))
    out = runner(feeds)
    # parameters the graph carries flattened (manifest ``graph_shape``) come back in their own shape
    return {**out, **{p.output: out[p.output].reshape(p.shape) for p in m.trainable if p.output in out}}


def sgd_gradients(compiled: CompiledGraphs, params, x, y) -> dict[str, np.ndarray]:
    """dL/dp as the train step applies it: with plain SGD and lr = 1, p_new = p - dL/dp."""
    assert compiled.manifest.optimizer == "sgd" and compiled.manifest.optimizer_params["weight_decay"] == 0.0
    out = train_step(compiled, GraphRunner(compiled.train_step), params, x, y, lr=1.0)
    return {p.name: params[p.name] - out[p.output] for p in compiled.manifest.trainable}


def eval_loss(compiled: CompiledGraphs, runner: GraphRunner, params, x, y) -> float:
    feeds = {"x": x, "y": y, **param_feeds(compiled, params)}
    return float(runner(feeds)["loss"])


def finite_difference_check(compiled: CompiledGraphs, x, y, grads, probes: int = 5, h: float = 1e-6,
                            rtol: float = 1e-5, atol: float = 1e-8, seed: int = 0) -> None:
    """Central differences of the eval graph's loss at ``probes`` random entries of each parameter."""
    rng = np.random.default_rng(seed)
    runner = GraphRunner(compiled.eval)
    params = {k: v.copy() for k, v in compiled.initial_params.items()}
    for spec in compiled.manifest.trainable:
        flat = params[spec.name].reshape(-1)
        for j in rng.choice(flat.size, size=min(probes, flat.size), replace=False):
            saved = flat[j]
            flat[j] = saved + h
            plus = eval_loss(compiled, runner, params, x, y)
            flat[j] = saved - h
            minus = eval_loss(compiled, runner, params, x, y)
            flat[j] = saved
            numeric = (plus - minus) / (2 * h)
            analytic = grads[spec.name].reshape(-1)[j]
            assert abs(numeric - analytic) <= atol + rtol * abs(numeric), (
                f"{spec.name}[{j}]: finite difference {numeric!r} vs compiled gradient {analytic!r}"
            )


def compile_for_gradients(model, loss: str, trainable=None, dtype: str = "float64") -> CompiledGraphs:
    compiled = compile_graphs(model, loss=loss, optimizer="sgd", trainable=trainable, dtype=dtype)
    assert_standard_graph(compiled.train_step)
    assert_standard_graph(compiled.eval)
    return compiled
