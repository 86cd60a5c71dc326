"""Where a node came from in the user's PyTorch code, read from the exporter's ``metadata_props``.

Dynamo names nodes ``n0_19`` or ``node_select``; its metadata carries the module scope
(``pkg.torch.onnx.name_scopes``, e.g. ``['', 'features', 'features.0', 'conv2d']``) and the Python
stack (``pkg.torch.onnx.stack_trace``). Messages name nodes by these when they are present.
"""

from __future__ import annotations

import ast
import re

import onnx

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
REWRITE_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"
FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def module_scope(node: onnx.NodeProto) -> str | None:
    """The PyTorch module path of ``node`` (``'features.0'``), '' for the root module, None if unknown.

    (Legacy-exporter node names such as ``/features/features.0/Conv`` already show their scope.)
    """
    raw = metadata(node).get(NAME_SCOPES_KEY)
    if raw is None:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if isinstance(s, str)]  # the last entry is the op itself
    return modules[-1] if modules else ""


def source_line(node: onnx.NodeProto) -> str | None:
    """``file.py:123`` of the innermost frame outside torch itself (else the innermost frame)."""
    frames = _FRAME.findall(metadata(node).get(STACK_TRACE_KEY, ""))
    if not frames:
        return None
    user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")]
    path, line = (user or frames)[-1]
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}"


def origin(node: onnx.NodeProto) -> str:
    """' (PyTorch module features.0, conv.py:456)' or '' when the metadata says nothing."""
    parts = []
    scope = module_scope(node)
    if scope is not None:
        parts.append(f"PyTorch module {scope or '<root>'}")
    line = source_line(node)
    if line:
        parts.append(line)
    return f" ({', '.join(parts)})" if parts else ""
