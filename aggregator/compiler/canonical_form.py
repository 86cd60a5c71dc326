"""Forward-graph rewrites that make exported models cheaper to differentiate, without changing results.

Exporters often write a linear layer as ``MatMul(x, Transpose(W))`` or ``MatMul(x, W) + b``. Taken
literally, the backward pass then needs an extra Transpose per step and a separate bias pass. For
2-D activations both are one ``Gemm`` (transB=1 / C=b), whose gradient rule uses Gemm's own
transpose flags.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper

log = logging.getLogger(__name__)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fold_linear_layers(
    graph: onnx.GraphProto, params: dict[str, np.ndarray], shapes: dict[str, tuple], protected: set[str]
) -> int:
    """Rewrite 2-D ``MatMul(A, Transpose(W))`` and ``MatMul(A, W) + b`` into Gemm in place.

    ``params`` are the float initializers; ``protected`` are values that must keep existing (graph
    outputs). Returns the number of rewrites.
    """
    nodes = list(graph.node)
    consumers = Counter(name for n in nodes for name in n.input)
    producer = {o: n for n in nodes for o in n.output}
    removed: set[int] = set()
    rewrites = 0

    def shape(name: str) -> tuple:
        return tuple(params[name].shape) if name in params else tuple(shapes.get(name, ()))

    for node in nodes:
        if node.op_type != "MatMul" or id(node) in removed:
            continue
        a, b = node.input
        if len(shape(a)) != 2 or len(shape(b)) != 2:
            continue
        gemm_inputs, trans_b = [a, b], 0
        source = producer.get(b)
        if (source is not None and source.op_type == "Transpose" and source.input[0] in params
                and list(_attr(source, "perm", [1, 0])) == [1, 0] and consumers[b] == 1 and b not in protected):
            gemm_inputs, trans_b = [a, source.input[0]], 1
            removed.add(id(source))
        elif b not in params:
            continue
        out = node.output[0]
        bias_node = None
        users = [n for n in nodes if out in n.input]
        if len(users) == 1 and users[0].op_type == "Add" and out not in protected:
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            n_out = shape(b)[0] if trans_b else shape(b)[1]
            if other in params and params[other].shape in ((n_out,), (1, n_out)):
                bias_node = add
        replacement = helper.make_node(
            "Gemm", gemm_inputs + ([other] if bias_node else []),
            [bias_node.output[0] if bias_node else out], name=node.name or f"{out}_gemm", transB=trans_b,
        )
        node.CopyFrom(replacement)
        if bias_node is not None:
            removed.add(id(bias_node))
        rewrites += 1
    if removed:
        keep = [n for n in nodes if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
    if rewrites:
        log.debug("folded %d MatMul/Transpose/Add groups into Gemm", rewrites)
    return rewrites
