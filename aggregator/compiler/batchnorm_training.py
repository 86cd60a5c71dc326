"""BatchNormalization in training mode (``training_mode=1``, torch's ``model.train()`` export).

The train step normalises with the batch's statistics and updates the running statistics the way
torch does (an exponential average with torch's momentum = 1 - ONNX momentum, and the *unbiased*
batch variance for the running variance; ONNX's own BatchNormalization training outputs use the
biased one, so the update is emitted in standard ops rather than read from the op). The running
statistics are bundle *buffers*: train_step.onnx reads and writes them, eval.onnx reads them and
normalises with them (inference BatchNormalization), as ``model.eval()`` does.

The gradient rule recomputes the batch statistics with exactly the nodes the forward emits, so
onnxruntime's common-subexpression elimination computes them once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import CompileError
from aggregator.compiler.grad_context import GradContext, describe, node_attrs
from edge_sdk.training.bundle import BufferSpec

RUNNING_KINDS = ("running_mean", "running_var")


def is_training_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and bool(int(node_attrs(node).get("training_mode", 0)))


def _epsilon(node: onnx.NodeProto) -> float:
    return float(node_attrs(node).get("epsilon", 1e-5))


def _torch_momentum(node: onnx.NodeProto) -> float:
    """torch's momentum (weight of the new batch) from the float32 ONNX attribute, rounded back to the
    decimal torch was given (1 - float32(0.9) is 0.10000002, torch uses 0.1)."""
    onnx_momentum = float(node_attrs(node).get("momentum", 0.9))
    return float(f"{1.0 - onnx_momentum:.6g}")


@dataclass
class BatchStatistics:
    """Per-channel batch statistics, keepdims-shaped [1, C, 1, ...]."""

    mean: str
    var: str  # biased, as the normalisation uses it
    inv_std: str
    x_hat: str


def batch_statistics(em: Emitter, node: onnx.NodeProto, rank: int) -> BatchStatistics:
    """Emitted identically by the forward and the gradient rule (so onnxruntime merges the two)."""
    x = node.input[0]
    axes = [0] + list(range(2, rank))
    mean = em.reduce("ReduceMean", x, axes, keepdims=True, hint="bn_batch_mean")
    centred = em.sub(x, mean)
    var = em.reduce("ReduceMean", em.mul(centred, centred), axes, keepdims=True, hint="bn_batch_var")
    inv_std = em.node("Reciprocal", [em.node("Sqrt", [em.add(var, em.scalar(_epsilon(node)))])])
    return BatchStatistics(mean=mean, var=var, inv_std=inv_std, x_hat=em.mul(centred, inv_std, hint="bn_x_hat"))


def _per_channel(em: Emitter, value: str, rank: int) -> str:
    return em.reshape(value, [1, -1] + [1] * (rank - 2))


def training_batchnorm_grad(ctx: GradContext, node: onnx.NodeProto, grads: list) -> list:
    """y = x_hat * scale + bias with x_hat = (x - mean_B) / sqrt(var_B + eps) over the batch B:
    dx = scale * inv_std * (g - (sum g + x_hat * sum(g x_hat)) / m), dscale = sum(g x_hat), dbias = sum g."""
    em = ctx.em
    x, scale, bias = node.input[:3]
    rank = len(ctx.shape(node, x))
    stats = batch_statistics(em, node, rank)
    g = grads[0]
    axes = [0] + list(range(2, rank))
    out: list[str | None] = [None] * len(node.input)
    sum_g = em.reduce("ReduceSum", g, axes, keepdims=True)
    sum_gx = em.reduce("ReduceSum", em.mul(g, stats.x_hat), axes, keepdims=True)
    if ctx.needs(x):
        count = em.div(em.element_count(x), em.scalar(float(ctx.static_shape(node, x)[1])))
        correction = em.div(em.add(sum_g, em.mul(stats.x_hat, sum_gx)), count)
        out[0] = em.mul(em.sub(g, correction), em.mul(_per_channel(em, scale, rank), stats.inv_std))
    if ctx.needs(scale):
        out[1] = em.reshape(sum_gx, [-1])
    if ctx.needs(bias):
        out[2] = em.reshape(sum_g, [-1])
    return out


@dataclass
class RunningStatistics:
    """The training-mode BatchNormalization nodes of a model and their running-statistics buffers."""

    nodes: list[onnx.NodeProto]
    specs: tuple[BufferSpec, ...]
    initial: dict[str, np.ndarray]

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.specs}

    def lower_for_training(self, forward: Sequence[onnx.NodeProto], em: Emitter,
                           shapes: dict[str, tuple]) -> list[onnx.NodeProto]:
        """Replace each training BatchNormalization by batch-statistics nodes and running updates."""
        outputs = {s.name: s.output for s in self.specs}
        lowered: list[onnx.NodeProto] = []
        for node in forward:
            if not is_training_batchnorm(node):
                lowered.append(node)
                continue
            start = len(em.nodes)
            x, scale, bias, mean, var = node.input[:5]
            rank = len(shapes[x])
            stats = batch_statistics(em, node, rank)
            em.node("Add", [em.mul(stats.x_hat, _per_channel(em, scale, rank)), _per_channel(em, bias, rank)],
                    outputs=[node.output[0]])
            momentum = _torch_momentum(node)
            count = em.element_count(x)
            channels = float(shapes[x][1])
            batch = em.div(count, em.scalar(channels))
            bessel = em.div(batch, em.sub(batch, em.scalar(1.0)))  # m / (m - 1): torch's running var is unbiased
            keep, new = em.scalar(1.0 - momentum), em.scalar(momentum)
            for running, batch_value in ((mean, stats.mean), (var, em.mul(stats.var, bessel))):
                update = em.mul(em.reshape(batch_value, [-1]), new)
                em.node("Add", [em.mul(running, keep), update], outputs=[outputs[running]])
            # The forward nodes go where the original node was; the emitter keeps only the rule nodes.
            lowered.extend(em.nodes[start:])
            del em.nodes[start:]
        return lowered

    def lower_for_eval(self, forward: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Training BatchNormalization -> inference BatchNormalization over the running statistics."""
        lowered = []
        for node in forward:
            if is_training_batchnorm(node):
                node = helper.make_node("BatchNormalization", list(node.input[:5]), [node.output[0]],
                                        name=node.name, epsilon=_epsilon(node))
            lowered.append(node)
        return lowered


def plan_running_statistics(forward: Sequence[onnx.NodeProto], params: dict[str, np.ndarray],
                            unique: Callable[[str], str], federated: bool, dtype: str) -> RunningStatistics:
    """Find training-mode BatchNormalization nodes and name a buffer for each running statistic."""
    nodes = [n for n in forward if is_training_batchnorm(n)]
    used_elsewhere = {name for n in forward if not is_training_batchnorm(n) for name in n.input}
    specs, initial, seen = [], {}, set()
    for node in nodes:
        if len(node.output) > 1 and any(o in used_elsewhere for o in node.output[1:] if o):
            raise CompileError(f"{describe(node)}: its running-statistics outputs feed other nodes; the compiler "
                               "carries running statistics as bundle buffers and cannot expose them in the graph")
        for name, kind in zip(node.input[3:5], RUNNING_KINDS, strict=True):
            if name not in params:
                raise CompileError(f"{describe(node)}: its {kind} {name!r} is not an initializer; training-mode "
                                   "BatchNormalization needs its running statistics as initializers")
            if name in seen:
                raise CompileError(f"{describe(node)}: {kind} {name!r} is shared with another BatchNormalization "
                                   "(an exporter merged equal initializers); export without initializer sharing")
            seen.add(name)
            specs.append(BufferSpec(name=name, kind=kind, shape=tuple(int(d) for d in params[name].shape),
                                    dtype=dtype, input=name, output=unique(f"{name}__new"), federated=federated))
            initial[name] = np.array(params[name], order="C")
    return RunningStatistics(nodes=nodes, specs=tuple(specs), initial=initial)
