"""Export a PyTorch model to ONNX so that the compiler trains exactly what PyTorch trains.

The exporters' defaults are for inference and lose parameters (see docs/compiler.md):
``do_constant_folding`` folds eval-mode BatchNorm into the Conv, the initializer de-duplication pass
merges equal-valued tensors (zero biases, unit norm weights) into one, and dynamo's optimizer
also drops zero biases and pre-transposes weights under generated names. The legacy (TorchScript)
exporter with ``do_constant_folding=False`` and ``keep_initializers_as_inputs=True`` (which also
skips de-duplication) keeps every ``named_parameters()`` tensor under its PyTorch name.

torch is a host-side dependency only, imported when the helper is called.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "output"


def torch_to_onnx(model, example, path: str | Path | None = None, *, opset: int = 17,
                  input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME):
    """Export ``model`` (in its current train/eval mode: call ``model.eval()`` for frozen BatchNorm
    statistics) with ``example`` as a batch of inputs; returns the ``onnx.ModelProto`` and writes
    it to ``path`` when given. The batch axis is dynamic; every other dimension is ``example``'s.
    """
    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, export_params=True,
            do_constant_folding=False,  # keeps BatchNorm as BatchNormalization with its own weight and bias
            keep_initializers_as_inputs=True,  # skips the pass that merges equal-valued initializers
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    missing = missing_parameters(proto, [name for name, p in model.named_parameters() if p.requires_grad])
    if missing:
        log.warning("the export lacks parameters %s (unused in forward, or renamed by the exporter)", missing)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def missing_parameters(proto, names: Sequence[str]) -> list[str]:
    """The PyTorch parameter names that are not initializers of ``proto``."""
    present = {t.name for t in proto.graph.initializer}
    return [name for name in names if name not in present]
