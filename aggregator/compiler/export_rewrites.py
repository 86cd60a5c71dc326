"""Undo, or warn about, exporter rewrites that would make fleetlearn train something other than PyTorch.

Exporters optimise for inference, and some of their rewrites change what can be trained:
- the legacy exporter merges equal-valued initializers (zero biases, unit BN/LN weights) into one
  tensor plus ``Identity`` nodes. Untied here: each Identity output becomes its own parameter, named
  as the Identity output (which is the PyTorch name).
- both exporters fold eval-mode BatchNorm into the preceding Conv/Gemm, and dynamo and tf2onnx drop
  all-zero biases. That cannot be undone (the values are gone), so it is reported with an
  ``ExportRewriteWarning`` naming the layer and the export setting that keeps PyTorch's parameters.
- dynamo stores scalar constants (an attention scale, an h0 fill) as float initializers named
  ``val_N``. Single-element initializers with such exporter-made names that no layer uses as a
  weight or bias are frozen (``frozen_scalars``). Named ones stay trainable: PyTorch has real
  learnable scalars (``logit_scale``, ``Linear(n, 1).bias``), and freezing those would be just as silent.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from aggregator.compiler.constant_folding import fold_constants
from aggregator.compiler.errors import ExportRewriteWarning
from aggregator.compiler.node_origin import FX_NODE_KEY, REWRITE_RULE_KEY, metadata, module_scope, origin

log = logging.getLogger(__name__)

# Input slots that hold a layer's own parameters: a single-element value there is a real parameter
# (Linear(n, 1).bias, BatchNorm2d(1).weight); anywhere else it is an exporter's scalar constant.
PARAMETER_SLOTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2), "Gather": (0,), "GRU": (1, 2, 3), "LSTM": (1, 2, 3),
}
# Names exporters give the constants they create (dynamo val_N, lifted tensor constants, legacy onnx::,
# tf2onnx folds); a PyTorch parameter is named by its module path instead.
EXPORTER_CONSTANT_NAME = re.compile(r"^(_?val_\d+|onnx::.*|.*_tensor_constant\d*|scalar_tensor.*|const_fold_opt__\d+)$")
KEEP_PARAMETERS = ("export with aggregator.export.torch_to_onnx, or the legacy exporter with "
                   "do_constant_folding=False and keep_initializers_as_inputs=True, or dynamo with optimize=False")


def rewrite_export(model: onnx.ModelProto, source: str) -> None:
    """Untie merged initializers, fold constant sub-graphs and warn about what cannot be undone, in place."""
    untie_identity_initializers(model.graph)
    fold_constants(model)
    for message in export_losses(model):
        log.warning("%s: %s", source, message)
        warnings.warn(f"{source}: {message}", ExportRewriteWarning, stacklevel=4)


def untie_identity_initializers(graph: onnx.GraphProto) -> list[str]:
    """Replace each ``Identity(initializer)`` by a copy of the initializer under the Identity's output name."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    untied, kept = [], []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]).copy(), node.output[0])
            graph.initializer.append(copy)
            untied.append(node.output[0])
        else:
            kept.append(node)
    if untied:
        del graph.node[:]
        graph.node.extend(kept)
        log.info("untied %d initializers the exporter had merged by value: %s", len(untied), ", ".join(untied))
    return untied


def frozen_scalars(graph: onnx.GraphProto, params: dict[str, np.ndarray]) -> set[str]:
    """Exporter-made single-element float initializers that no layer uses as a weight or bias: settings."""
    in_slots = set()
    for node in graph.node:
        for index in PARAMETER_SLOTS.get(node.op_type, ()):
            if index < len(node.input):
                in_slots.add(node.input[index])
    return {name for name, value in params.items()
            if value.size == 1 and name not in in_slots and EXPORTER_CONSTANT_NAME.match(name)}


def export_losses(model: onnx.ModelProto) -> list[str]:
    """One message per layer whose PyTorch parameters the export no longer holds."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tf2onnx = model.producer_name.startswith("tf2onnx")
    messages = []
    for node in graph.node:
        where = f"{node.op_type} {node.name!r}{origin(node)}"
        rules = metadata(node).get(REWRITE_RULE_KEY, "")
        weight = node.input[1] if len(node.input) > 1 else ""
        if "FuseBatchNorm" in rules or (
            node.op_type in ("Conv", "ConvTranspose", "Gemm") and weight in inits and weight.startswith("onnx::")
        ):
            messages.append(
                f"{where}: the exporter folded a BatchNormalization into this layer (its weight {weight!r} is not "
                f"a PyTorch parameter), so the BatchNorm's weight and bias cannot be trained; {KEEP_PARAMETERS}"
            )
        if "RemoveOptionalBias" in rules:
            messages.append(
                f"{where}: the exporter dropped this layer's all-zero bias, so it cannot be trained; {KEEP_PARAMETERS}"
            )
        elif tf2onnx and _lacks_bias(node, consumers):
            messages.append(
                f"{where}: has no bias; tf2onnx drops all-zero biases, so if the Keras layer has one it cannot be "
                "trained: give the bias a non-zero value (e.g. 1e-6) before converting"
            )
        if node.op_type == "BatchNormalization" and _exported_from_train_mode(node):
            messages.append(
                f"{where}: comes from a BatchNorm in training mode (model.train()), but the exporter wrote an "
                "inference BatchNormalization that normalises with the running statistics; call model.eval() "
                "before exporting (statistics stay frozen), or export with the legacy exporter and "
                "training=torch.onnx.TrainingMode.TRAINING to train with batch statistics"
            )
    messages += _merged_parameters(graph, inits)
    return messages


def _lacks_bias(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or (node.op_type != "MatMul" and len(node.input) > 2):
        return False
    users = consumers.get(node.output[0], [])
    return not any(u.op_type in ("Add", "BatchNormalization") for u in users)


def _exported_from_train_mode(node: onnx.NodeProto) -> bool:
    training = any(a.name == "training_mode" and a.i for a in node.attribute)
    fx = metadata(node).get(FX_NODE_KEY, "") + node.name
    return not training and "_native_batch_norm_legit" in fx and "no_training" not in fx


def _merged_parameters(graph: onnx.GraphProto, inits: set[str]) -> list[str]:
    """Initializers used as parameters by layers of different PyTorch modules (dynamo's optimizer
    merges equal-valued ones); only visible when the nodes carry their module scope."""
    scopes: dict[str, list[str]] = {}
    for node in graph.node:
        scope = module_scope(node)
        if scope is None:
            continue
        for index in PARAMETER_SLOTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in inits:
                scopes.setdefault(node.input[index], []).append(scope)
    return [
        f"initializer {name!r} is the parameter of modules {', '.join(sorted(set(used)))}: the exporter merged "
        f"equal-valued parameters (a shared weight would be trained as one); {KEEP_PARAMETERS}"
        for name, used in scopes.items() if len(set(used)) > 1
    ]
