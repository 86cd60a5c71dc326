"""Errors the compiler raises for models it cannot turn into a training bundle."""

from __future__ import annotations

from edge_sdk.errors import FleetlearnError


class CompileError(FleetlearnError):
    """The input model or the options cannot be compiled; the message names the node/option and why."""


class UnsupportedOpError(CompileError):
    """A node on the gradient path uses an op or attribute value the compiler has no rule for."""
