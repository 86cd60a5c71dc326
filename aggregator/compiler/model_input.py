"""Reading and normalising the inference model the user hands to the compiler.

The compiler works on one canonical form: a single float input renamed ``x`` with a dynamic batch
dimension, a single output, every float tensor in the requested dtype, and static shapes inferred
for every intermediate value. Doing this once up front keeps the gradient rules simple.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from aggregator.compiler.canonical_form import fold_linear_layers
from aggregator.compiler.conv_lowering import lower_small_convolutions
from aggregator.compiler.errors import CompileError
from aggregator.compiler.export_rewrites import rewrite_export

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 13, 21
FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}
INPUT_NAME = "x"
BATCH_DIM = "N"

Shape = tuple  # of int | None (None = dynamic or unknown)


@dataclass
class PreparedModel:
    """The normalised model and what the compiler derived from it."""

    model: onnx.ModelProto
    opset: int
    output_name: str
    params: dict[str, np.ndarray]  # float initializers, in the target dtype
    constants: dict[str, np.ndarray]  # non-float initializers (shape tensors and the like)
    shapes: dict[str, Shape]  # value name -> static shape (None for unknown dims)
    elem_types: dict[str, int]  # value name -> TensorProto element type
    source: str


def load_model(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    """Return the model proto and a description of where it came from."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>"
    path = Path(model)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompileError(f"cannot read ONNX model {path}: {exc.strerror or exc}") from exc
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise CompileError(f"{path} is not a valid ONNX model (truncated or corrupt protobuf: {exc})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise CompileError(f"{path} is not a valid ONNX model: it holds no graph (truncated or not ONNX?)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise CompileError(
                f"cannot load the external weights of {path} (an exporter writes them to a .onnx.data file "
                f"beside the model: copy it along): {exc}"
            ) from exc
    return proto, str(path)


def _check_opset(model: onnx.ModelProto, source: str) -> int:
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    if opset is None:
        raise CompileError(f"{source} imports no ai.onnx opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CompileError(
            f"{source} uses ai.onnx opset {opset}; the compiler accepts opsets {MIN_OPSET} to {MAX_OPSET} "
            "(re-export with e.g. opset_version=17)"
        )
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise CompileError(
                f"node {node.name!r} uses op {node.domain}::{node.op_type}; only ai.onnx (standard) ops can run "
                "on a device with plain onnxruntime"
            )
    return opset


def _convert_float(tensor: TensorProto, target: int) -> TensorProto:
    if tensor.data_type in FLOAT_TYPES.values() and tensor.data_type != target:
        dtype = np.float32 if target == TensorProto.FLOAT else np.float64
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name)
    return tensor


def _convert_dtype(model: onnx.ModelProto, target: int) -> None:
    """Cast every float32/float64 tensor, type annotation and Cast target to ``target``, in place."""
    graph = model.graph
    for i, init in enumerate(list(graph.initializer)):
        graph.initializer[i].CopyFrom(_convert_float(init, target))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_convert_float(attr.t, target))
            elif attr.name == "to" and node.op_type == "Cast" and attr.i in FLOAT_TYPES.values():
                attr.i = target
            elif attr.type == onnx.AttributeProto.GRAPH:
                raise CompileError(f"node {node.name!r} ({node.op_type}) has a subgraph; control flow is not supported")
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type in FLOAT_TYPES.values():
            value.type.tensor_type.elem_type = target
    del graph.value_info[:]


def prepare_model(
    model: onnx.ModelProto | str | Path, dtype: str, output: str | None = None, strip_softmax: bool = False
) -> PreparedModel:
    """Load, validate and normalise ``model`` (see module docstring).

    ``output`` picks one of several model outputs (see ``select_output``); ``strip_softmax`` trains
    on the logits under a trailing Softmax, for cross-entropy (see ``strip_trailing_softmax``).
    """
    if dtype not in FLOAT_TYPES:
        raise CompileError(f"dtype must be one of {sorted(FLOAT_TYPES)}, got {dtype!r}")
    proto, source = load_model(model)
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never mutate the caller's proto
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise CompileError(f"{source} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    select_output(proto.graph, output, source)
    if strip_softmax:
        strip_trailing_softmax(proto, source)
    opset = _check_opset(proto, source)
    target = FLOAT_TYPES[dtype]
    _convert_dtype(proto, target)
    graph = proto.graph

    init_names = {t.name for t in graph.initializer}
    real_inputs = [v for v in graph.input if v.name not in init_names]
    if len(graph.input) != len(real_inputs):  # IR < 4 style: initializers listed as inputs
        keep = list(real_inputs)
        del graph.input[:]
        graph.input.extend(keep)
    if len(real_inputs) != 1:
        raise CompileError(
            f"{source} has {len(real_inputs)} data inputs ({[v.name for v in real_inputs]}); the compiler "
            "needs exactly one (the batch x)"
        )
    x = real_inputs[0]
    if x.type.tensor_type.elem_type not in (target, TensorProto.INT64):
        raise CompileError(f"model input {x.name!r} is neither a float tensor nor int64 (token ids)")
    dims = x.type.tensor_type.shape.dim
    if len(dims) == 0:
        raise CompileError(f"model input {x.name!r} has no known rank; export it with a shape")
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims):  # let inference tell whether the output's batch dimension follows x's
        out_dims[0].Clear()
        out_dims[0].dim_param = "output_batch"
    for name in RESERVED_NAMES:
        if name in init_names:
            raise CompileError(f"the model has an initializer named {name!r}, which the bundle reserves")
    _free_reserved_names(graph, keep={x.name, graph.output[0].name}, taken=init_names)
    _rename_value(graph, x.name, INPUT_NAME)
    rewrite_export(proto, source)  # untie merged initializers, fold constants, warn about lost parameters
    output_name = graph.output[0].name

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise CompileError(f"shape inference failed on {source}: {str(exc).splitlines()[0]}") from exc
    shapes: dict[str, Shape] = {}
    elem_types: dict[str, int] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = value.type.tensor_type
        elem_types[value.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    out_shape = shapes.get(output_name)
    if out_shape and out_shape[0] is not None:
        raise CompileError(
            f"the output {output_name!r} of {source} has a fixed batch dimension of {out_shape[0]} when the input "
            "batch is dynamic (a reshape with a hard-coded batch size?); export with a dynamic batch axis, "
            "e.g. torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}) or dynamic_shapes"
        )
    params: dict[str, np.ndarray] = {}
    constants: dict[str, np.ndarray] = {}
    float_inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == target}
    fold_linear_layers(graph, float_inits, shapes, protected={output_name})
    lower_small_convolutions(graph, float_inits, shapes, elem_types, _name_source(graph), target)
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        shapes[init.name] = tuple(array.shape)
        elem_types[init.name] = init.data_type
        (params if init.data_type == target else constants)[init.name] = array
    for node in graph.node:  # Constant nodes: their values are known at compile time too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    return PreparedModel(proto, opset, output_name, params, constants, shapes, elem_types, source)


def _name_source(graph: onnx.GraphProto):
    """A function handing out value names unused in ``graph`` (nor reserved by the bundle)."""
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | set(RESERVED_NAMES)
    for node in graph.node:
        taken.update(node.input)
        taken.update(node.output)
        taken.add(node.name)
    counter = iter(range(1, 1 << 62))

    def fresh(hint: str) -> str:
        while True:
            name = f"{hint}__{next(counter)}"
            if name not in taken:
                taken.add(name)
                return name

    return fresh


RESERVED_NAMES = ("x", "y", "lr", "step", "loss", "output")


def select_output(graph: onnx.GraphProto, output: str | None, source: str) -> None:
    """Keep one model output and only the nodes and initializers it needs, in place.

    Classifier exports often carry a second output: skl2onnx adds an int64 ``label`` computed with
    ai.onnx.ml ops that plain onnxruntime on a device need not run. Without ``output``, the one float
    output is chosen when there is exactly one.
    """
    names = [v.name for v in graph.output]
    if output is not None:
        if output not in names:
            raise CompileError(f"--output {output!r} is not an output of {source}; its outputs are {names}")
        chosen = output
    elif len(names) == 1:
        chosen = names[0]
    else:
        floats = [v.name for v in graph.output if v.type.tensor_type.elem_type in FLOAT_TYPES.values()]
        if len(floats) != 1:
            raise CompileError(
                f"{source} has {len(names)} outputs {names}; choose the one to train with --output NAME"
            )
        chosen = floats[0]
        log.info("%s: training output %r (the only float output of %s)", source, chosen, names)
    if len(names) > 1:
        keep = [v for v in graph.output if v.name == chosen]
        del graph.output[:]
        graph.output.extend(keep)
        _prune_unused(graph)


def strip_trailing_softmax(model: onnx.ModelProto, source: str) -> None:
    """Train cross-entropy on the logits when the model's output is Softmax(logits), in place.

    Cross-entropy is defined on logits; applied to probabilities it would softmax twice and train
    badly. Exporters of classifiers (skl2onnx, Keras heads) end in Softmax, possibly followed by
    Identity, so the output is rewired to the Softmax's input. Predictions (argmax) are unchanged.
    A trailing LogSoftmax is kept: log-softmax is idempotent, so cross-entropy on it is exact.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    name = graph.output[0].name
    node = producer.get(name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if axis != -1:
        inferred = onnx.shape_inference.infer_shapes(model)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        if ranks.get(node.input[0]) != axis + 1:
            return  # a Softmax over a non-class axis is part of the model, not its head
    logits = node.input[0]
    elem_type = graph.output[0].type.tensor_type.elem_type
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(logits, elem_type, None))
    _prune_unused(graph)
    log.info("%s ends in Softmax: cross-entropy trains its input %r (the logits)", source, logits)


def _prune_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and inputs that no graph output depends on."""
    needed = {v.name for v in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for field in (graph.initializer, graph.input):
        keep = [item for item in field if item.name in needed]
        del field[:]
        field.extend(keep)


def _free_reserved_names(graph: onnx.GraphProto, keep: set[str], taken: set[str]) -> None:
    """Rename intermediate values that use a name the bundle reserves for its own inputs/outputs."""
    used = {name for node in graph.node for name in list(node.input) + list(node.output)}
    for name in RESERVED_NAMES:
        if name in used and name not in keep and name not in taken:
            new, k = f"{name}__model", 1
            while new in used:
                k += 1
                new = f"{name}__model{k}"
            _rename_value(graph, name, new)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
