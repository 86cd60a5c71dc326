"""Host-side compiler from an ONNX inference model to a training bundle (needs ``onnx``).

Public API: ``compile_model`` (writes a bundle) and ``compile_graphs`` (builds it in memory),
``CompileError`` for anything the compiler refuses, and ``supported_ops()``.
"""

from aggregator.compiler.backward import supported_ops
from aggregator.compiler.bundle_compiler import CompiledGraphs, compile_graphs, compile_model
from aggregator.compiler.errors import CompileError, UnsupportedOpError

__all__ = ["CompileError", "CompiledGraphs", "UnsupportedOpError", "compile_graphs", "compile_model", "supported_ops"]
