"""Fold constant sub-graphs into Constant nodes before differentiation.

Exporters leave computations on constants in the graph: dynamo's ``optimize=False`` export builds
a bias-free Conv's zero bias as ``Expand(CastLike(0, x), Shape(weight))`` and a ReduceMean's axes as
``Reshape(Constant, Constant)``. Gradient rules need such settings as compile-time values, so every
node whose inputs are all known is evaluated once (onnx.reference) and replaced by a Constant node.

Float initializers are never folded through: they are the parameters that may be trained. Only
their shape (``Shape``/``Size``) and a value's element type (``CastLike``'s second input) count
as known. Folded values become Constant nodes, not initializers, so they are never trained.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

log = logging.getLogger(__name__)

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
NEVER_FOLDED = frozenset({
    "Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout", "If", "Loop", "Scan",
})


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of inputs, initializers and (when a CastLike needs them) inferred intermediates."""
    graph = model.graph
    values = list(graph.input)
    if any(n.op_type == "CastLike" for n in graph.node):
        # on failure, CastLike nodes whose target type is unknown are simply not folded
        with contextlib.suppress(onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
            values += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace constant sub-graphs of ``model`` by Constant nodes in place; returns how many nodes were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    types = _elem_types(model)
    known = {name for name, t in inits.items() if t.data_type not in FLOAT_TYPES}
    known.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    outputs = {v.name for v in graph.output}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in NEVER_FOLDED or node.domain not in ("", "ai.onnx") or any(o in outputs for o in node.output):
            continue
        if node.op_type in ("Shape", "Size") and node.input[0] in inits:
            pass  # only the initializer's shape is read
        elif node.op_type == "CastLike" and node.input[0] in known and node.input[1] in types:
            pass  # the second input only supplies an element type
        elif not all(name in known for name in node.input if name):
            continue
        folded.append(node)
        known.update(o for o in node.output if o)
    if not folded:
        return 0
    folded_ids = {id(n) for n in folded}
    remaining_inputs = {name for n in graph.node if id(n) not in folded_ids for name in n.input}
    wanted = [o for n in folded for o in n.output if o in remaining_inputs]
    constant_nodes = [n for n in graph.node if n.op_type == "Constant"]
    values = _evaluate(model, constant_nodes + folded, wanted, inits, types)
    if values is None:
        return 0
    rebuilt = []
    for node in graph.node:
        if id(node) not in folded_ids:
            rebuilt.append(node)
            continue
        for name in node.output:
            if name in values:
                tensor = numpy_helper.from_array(np.asarray(values[name]), name)
                label = f"{node.name or name}_folded"
                rebuilt.append(helper.make_node("Constant", [], [name], name=label, value=tensor))
    del graph.node[:]
    graph.node.extend(rebuilt)
    log.info("folded %d constant nodes into %d constants", len(folded), len(values))
    return len(folded)


def _evaluate(model, nodes, wanted, inits, types) -> dict[str, np.ndarray] | None:
    """Run the folded nodes once on the reference evaluator (CastLike becomes a Cast to the known type)."""
    runnable = []
    for node in nodes:
        if node.op_type == "CastLike":
            node = helper.make_node("Cast", [node.input[0]], list(node.output), to=types[node.input[1]])
        runnable.append(node)
    produced = {o for n in runnable for o in n.output}
    used = [inits[name] for n in runnable for name in n.input if name in inits and name not in produced]
    graph = helper.make_graph(runnable, "fold", [], [helper.make_empty_tensor_value_info(w) for w in wanted],
                              initializer=list({t.name: t for t in used}.values()))
    mini = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        results = ReferenceEvaluator(mini).run(None, {})
    except Exception as exc:  # noqa: BLE001 -- an op the reference lacks: leave the graph as exported
        log.warning("could not fold %d constant nodes (%s: %s); compiling them as exported",
                    len(nodes), type(exc).__name__, exc)
        return None
    return dict(zip(wanted, results, strict=True))
