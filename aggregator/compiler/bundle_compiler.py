"""``compile_model``: an ONNX inference model in, a training bundle out.

The train-step graph is forward pass + loss + reverse-mode gradients (one rule per op) + a fused
optimiser update, all in standard ai.onnx ops so plain onnxruntime runs it on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aggregator.compiler.backward import NON_DIFFERENTIABLE, build_gradients
from aggregator.compiler.batchnorm_training import plan_running_statistics
from aggregator.compiler.emitter import Emitter
from aggregator.compiler.errors import CompileError
from aggregator.compiler.export_rewrites import frozen_scalars
from aggregator.compiler.losses import LOSSES, emit_loss
from aggregator.compiler.model_input import FLOAT_TYPES, INPUT_NAME, PreparedModel, prepare_model
from aggregator.compiler.optimizers import STATE_KINDS, UpdateEmitter, resolve_hyperparameters, state_scales
from aggregator.compiler.shared_weights import FROZEN_FILE, externalize_large_initializers
from edge_sdk.training.bundle import (
    FORMAT_VERSION,
    Manifest,
    ParameterSpec,
    StateSpec,
    TensorSpec,
    write_bundle,
)

log = logging.getLogger(__name__)

OUTPUT_NAME = "output"
LABELS_NAME = "y"
LOSS_NAME = "loss"
# Float inputs that are settings, not weights: an initializer used only in these slots is never
# trained (BatchNormalization's running statistics stay frozen; Dropout's ratio, ...).
NON_DIFFERENTIABLE_INPUTS = {
    "BatchNormalization": (3, 4), "Dropout": (1, 2), "Clip": (1, 2), "Reshape": (1,), "Expand": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "Pad": (1, 2, 3),
    "Slice": (1, 2, 3, 4), "Pow": (1,), "Gather": (1,),
}


@dataclass
class CompiledGraphs:
    """The two graphs and the manifest before they are written (useful for tests and inspection)."""

    train_step: onnx.ModelProto
    eval: onnx.ModelProto
    manifest: Manifest
    initial_params: dict[str, np.ndarray]
    initial_buffers: dict[str, np.ndarray] = field(default_factory=dict)  # running statistics


def compile_model(
    model: onnx.ModelProto | str | Path,
    out_dir: str | Path,
    *,
    loss: str,
    optimizer: str,
    optimizer_params: dict | None = None,
    trainable: Sequence[str] | None = None,
    dtype: str = "float32",
    output: str | None = None,
    federate_running_stats: bool = False,
) -> Manifest:
    """Compile ``model`` into a training bundle in ``out_dir`` and return its manifest.

    ``trainable`` lists parameter names or name prefixes to train (None: all); the others are
    constants of both graphs, stored once in the bundle (``shared_weights``). ``optimizer_params``
    overrides the defaults in ``aggregator.compiler.optimizers.DEFAULTS`` (momentum, beta1, beta2, eps, weight_decay).
    ``output`` names the model output to train when it has several (default: its only float output).
    ``federate_running_stats`` makes training-mode BatchNormalization's running statistics part of
    the device's federated update by default (see ``BufferSpec``; off: FedBN-style local statistics).
    """
    compiled = compile_graphs(
        model, loss=loss, optimizer=optimizer, optimizer_params=optimizer_params, trainable=trainable, dtype=dtype,
        output=output, federate_running_stats=federate_running_stats,
    )
    frozen = externalize_large_initializers([compiled.train_step, compiled.eval])
    return write_bundle(
        Path(out_dir),
        compiled.manifest,
        compiled.train_step.SerializeToString(),
        compiled.eval.SerializeToString(),
        {**compiled.initial_params, **compiled.initial_buffers},
        extra_files={FROZEN_FILE: frozen} if frozen else None,
    )


def select_trainable(prep: PreparedModel, trainable: Sequence[str] | None) -> list[str]:
    """Parameter names to train, in initializer order; selectors are exact names or prefixes."""
    weights = set()
    for node in prep.model.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        skip = NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())
        weights.update(name for i, name in enumerate(node.input) if i not in skip)
    candidates = [name for name in prep.params if name in weights]
    scalars = frozen_scalars(prep.model.graph, prep.params)  # exporter constants; trained only when named
    if scalars:
        log.info("freezing single-element constants %s (name one exactly in trainable to train it)", sorted(scalars))
    if trainable is None:
        chosen = [name for name in candidates if name not in scalars]
    else:
        if isinstance(trainable, str):
            trainable = [trainable]
        chosen = [name for name in candidates
                  if any(name == s or (name.startswith(s) and name not in scalars) for s in trainable)]
        for selector in trainable:
            if not any(name == selector or name.startswith(selector) for name in candidates):
                raise CompileError(
                    f"--trainable {selector!r} matches no parameter; parameters are: {', '.join(candidates)}"
                )
    if not chosen:
        raise CompileError("no trainable parameters selected: the model has no float initializers to train")
    return chosen


def compile_graphs(
    model: onnx.ModelProto | str | Path,
    *,
    loss: str,
    optimizer: str,
    optimizer_params: dict | None = None,
    trainable: Sequence[str] | None = None,
    dtype: str = "float32",
    output: str | None = None,
    federate_running_stats: bool = False,
) -> CompiledGraphs:
    """Build and check both graphs and the manifest without writing anything."""
    if loss not in LOSSES:
        raise CompileError(f"loss must be one of {LOSSES}, got {loss!r}")
    hp = resolve_hyperparameters(optimizer, optimizer_params)
    prep = prepare_model(model, dtype, output=output, strip_softmax=loss == "cross_entropy")
    train_names = select_trainable(prep, trainable)
    np_dtype = np.dtype(dtype)
    onnx_dtype = FLOAT_TYPES[dtype]

    out_shape = prep.shapes.get(prep.output_name)
    if out_shape is None:
        raise CompileError(f"the shape of the model output {prep.output_name!r} could not be inferred")
    out_shape = (None,) + tuple(out_shape[1:])
    x_shape = (None,) + tuple(prep.shapes[INPUT_NAME][1:])
    x_dtype = "int64" if prep.elem_types.get(INPUT_NAME) == TensorProto.INT64 else dtype  # token ids
    if loss == "cross_entropy":
        y_spec = TensorSpec(LABELS_NAME, (None,), "int64")
    else:
        y_spec = TensorSpec(LABELS_NAME, out_shape, dtype)

    forward = _forward_nodes(prep)
    shapes = dict(prep.shapes)
    shapes[OUTPUT_NAME] = prep.shapes[prep.output_name]
    taken = _all_names(prep) | {LABELS_NAME, LOSS_NAME, "lr", "step"}
    running = plan_running_statistics(forward, prep.params, lambda n: _unique(n, taken), federate_running_stats,
                                      dtype)
    frozen = {n: a for n, a in prep.params.items() if n not in train_names and n not in running.names}
    constants = {**prep.constants, **frozen}
    float_values = _float_values(prep)

    param_out = {p: _unique(f"{p}__new", taken) for p in train_names}
    state_names = {
        (p, kind): _unique(f"{p}__{kind}", taken) for p in train_names for kind in STATE_KINDS[optimizer]
    }
    state_out = {key: _unique(f"{name}__new", taken) for key, name in state_names.items()}

    # --- train step -------------------------------------------------------------------------
    em = Emitter(prep.opset, np_dtype, taken)
    d_output = emit_loss(em, loss, OUTPUT_NAME, LABELS_NAME, out_shape, with_grad=True, loss_name=LOSS_NAME)
    grads = build_gradients(em, forward, OUTPUT_NAME, d_output, train_names, shapes, constants, float_values)
    updater = UpdateEmitter(em, optimizer, hp, lr="lr", step="step")
    for p in train_names:
        kinds = STATE_KINDS[optimizer]
        updater.update(
            p, grads[p],
            {k: state_names[(p, k)] for k in kinds}, param_out[p], {k: state_out[(p, k)] for k in kinds},
        )
    flat = updater.flattened
    forward_train = running.lower_for_training(_rewrite_forward_for_training(forward, em), em, shapes)
    forward_train = _unflatten(em, flat, prep.params) + forward_train

    def carried(p: str) -> tuple[str, tuple]:
        """A trainable parameter's graph input and the shape both graphs carry it in."""
        return flat[p] if p in flat else (p, prep.params[p].shape)

    train_inputs = [
        _value(INPUT_NAME, _onnx_type(x_dtype), x_shape),
        _value(LABELS_NAME, _onnx_type(y_spec.dtype), y_spec.shape),
        _value("lr", onnx_dtype, ()),
        _value("step", TensorProto.INT64, ()),
    ]
    train_inputs += [_value(*carried(p)[:1], onnx_dtype, carried(p)[1]) for p in train_names]
    train_inputs += [_value(state_names[k], onnx_dtype, prep.params[k[0]].shape) for k in state_names]
    buffer_inputs = [_value(b.input, onnx_dtype, b.shape) for b in running.specs]
    train_inputs += buffer_inputs
    train_outputs = [_value(LOSS_NAME, onnx_dtype, ())]
    train_outputs += [_value(param_out[p], onnx_dtype, carried(p)[1]) for p in train_names]
    train_outputs += [_value(state_out[k], onnx_dtype, prep.params[k[0]].shape) for k in state_names]
    train_outputs += [_value(b.output, onnx_dtype, b.shape) for b in running.specs]
    train_model = _make_model(
        prep, "train_step", forward_train + em.nodes, train_inputs, train_outputs,
        _base_initializers(prep, frozen) + em.initializers,
    )

    # --- eval ---------------------------------------------------------------------------------
    em_eval = Emitter(prep.opset, np_dtype, taken)
    emit_loss(em_eval, loss, OUTPUT_NAME, LABELS_NAME, out_shape, with_grad=False, loss_name=LOSS_NAME)
    eval_inputs = train_inputs[:2] + [_value(*carried(p)[:1], onnx_dtype, carried(p)[1]) for p in train_names]
    eval_inputs += buffer_inputs
    eval_outputs = [_value(LOSS_NAME, onnx_dtype, ()), _value(OUTPUT_NAME, onnx_dtype, out_shape)]
    eval_forward = _unflatten(em_eval, flat, prep.params) + running.lower_for_eval(forward)
    eval_model = _make_model(
        prep, "eval", eval_forward + em_eval.nodes, eval_inputs, eval_outputs,
        _base_initializers(prep, frozen) + em_eval.initializers,
    )

    for graph in (train_model, eval_model):
        try:
            onnx.checker.check_model(graph, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise CompileError(f"internal error: the generated {graph.graph.name} graph is invalid: {exc}") from exc

    parameters = tuple(
        ParameterSpec(
            name=n, shape=tuple(int(d) for d in a.shape), dtype=dtype, trainable=n in param_out,
            input=carried(n)[0] if n in param_out else None, output=param_out.get(n),
            graph_shape=flat[n][1] if n in flat else None,
        )
        for n, a in prep.params.items() if n not in running.names
    )
    scales = state_scales(optimizer, hp)
    state = tuple(
        StateSpec(
            name=state_names[(p, k)], param=p, kind=k, shape=tuple(int(d) for d in prep.params[p].shape),
            dtype=dtype, input=state_names[(p, k)], output=state_out[(p, k)], scale=scales[k],
        )
        for (p, k) in state_names
    )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        opset=prep.opset,
        loss=loss,
        optimizer=optimizer,
        optimizer_params=hp,
        x=TensorSpec(INPUT_NAME, x_shape, x_dtype),
        y=y_spec,
        output=TensorSpec(OUTPUT_NAME, out_shape, dtype),
        parameters=parameters,
        state=state,
        source_model=prep.source,
        buffers=running.specs,
    )
    initial = {p: np.array(prep.params[p], order="C") for p in train_names}
    log.info("compiled %s: %d trainable, %d frozen parameters, %d train-step nodes",
             prep.source, len(train_names), len(frozen), len(train_model.graph.node))
    return CompiledGraphs(train_model, eval_model, manifest, initial, running.initial)


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}{k}"
    taken.add(candidate)
    return candidate


def _all_names(prep: PreparedModel) -> set[str]:
    names = {INPUT_NAME, OUTPUT_NAME} | set(prep.params) | set(prep.constants)
    for node in prep.model.graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _float_values(prep: PreparedModel) -> set[str]:
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE}
    values = {name for name, t in prep.elem_types.items() if t in floats}
    values.add(OUTPUT_NAME)
    return values


def _forward_nodes(prep: PreparedModel) -> list[onnx.NodeProto]:
    """The model's nodes with its output renamed to ``output``."""
    nodes = []
    for node in prep.model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            if name == prep.output_name:
                copy.input[i] = OUTPUT_NAME
        for i, name in enumerate(copy.output):
            if name == prep.output_name:
                copy.output[i] = OUTPUT_NAME
        nodes.append(copy)
    if prep.output_name == INPUT_NAME or prep.output_name in prep.params:
        raise CompileError("the model output is its input or a parameter; there is nothing to train")
    return nodes


def _rewrite_forward_for_training(forward: list[onnx.NodeProto], em: Emitter) -> list[onnx.NodeProto]:
    """Forward nodes as the train step needs them (rules may have asked for extra outputs)."""
    return [em.forward_rewrites.get(node.output[0], node) for node in forward]


def _unflatten(em: Emitter, flat: dict[str, tuple[str, tuple[int, int]]],
               params: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """``p = Reshape(p__2d)`` for each parameter the graphs carry flattened, so the forward and
    backward passes read it in its own shape; onnxruntime's Reshape of a graph input is a view."""
    nodes = []
    for p, (graph_input, _) in flat.items():
        nodes.append(helper.make_node("Reshape", [graph_input, em.ints(params[p].shape)], [p],
                                      name=em.fresh(f"unflatten_{p}")))
    return nodes


def _base_initializers(prep: PreparedModel, frozen: dict[str, np.ndarray]) -> list[onnx.TensorProto]:
    inits = [numpy_helper.from_array(np.array(a, order="C"), n) for n, a in frozen.items()]
    constant_outputs = {n.output[0] for n in prep.model.graph.node if n.op_type == "Constant"}
    for init in prep.model.graph.initializer:
        if init.name in prep.constants and init.name not in constant_outputs:
            inits.append(init)
    return inits


def _onnx_type(dtype: str) -> int:
    return {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "int64": TensorProto.INT64}[dtype]


def _value(name: str, elem_type: int, shape: Sequence) -> onnx.ValueInfoProto:
    dims = ["N" if d is None and i == 0 else (f"d{i}" if d is None else int(d)) for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, elem_type, dims)


def _topological_sort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Order nodes so each comes after its inputs' producers, keeping the given order where it can
    (optimisations such as update fusion may emit a node after the node that reads it)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    ordered: list[onnx.NodeProto] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done

    def visit(i: int) -> None:
        stack = [(i, iter(nodes[i].input))]
        state[i] = 1
        while stack:
            j, inputs = stack[-1]
            for name in inputs:
                k = producer.get(name)
                if k is not None and name not in available and state[k] == 0:
                    state[k] = 1
                    stack.append((k, iter(nodes[k].input)))
                    break
                if k is not None and state[k] == 1 and name not in available:
                    raise CompileError(f"internal error: the generated graph has a cycle through {name!r}")
            else:
                stack.pop()
                state[j] = 2
                ordered.append(nodes[j])

    for i in range(len(nodes)):
        if state[i] == 0:
            visit(i)
    return ordered


def _make_model(prep, name, nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    available = {v.name for v in inputs} | {t.name for t in initializers}
    nodes = _topological_sort(list(nodes), available)
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", prep.opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="fleetlearn.compiler")
    model.ir_version = max(helper.find_min_ir_version_for(opsets), min(prep.model.ir_version, 10))
    return model
