"""Host-side compiler from an ONNX inference model to a training bundle (needs ``onnx``)."""
