"""Errors the compiler raises for models it cannot turn into a training bundle."""

from __future__ import annotations

from edge_sdk.errors import FleetlearnError


class CompileError(FleetlearnError):
    """The input model or the options cannot be compiled; the message names the node/option and why."""


class UnsupportedOpError(CompileError):
    """A node on the gradient path uses an op or attribute value the compiler has no rule for."""


class ExportRewriteWarning(UserWarning):
    """The exporter rewrote the model so that the compiler cannot train what PyTorch trains (folded
    BatchNorm, dropped biases, merged parameters); the message names the layer and the export setting
    that keeps PyTorch's parameters."""
