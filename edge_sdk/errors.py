"""The root of fleetlearn's typed exceptions.

Every error a user can cause (bad input, bad config, tampered message) derives from
``FleetlearnError`` so the CLI and services can report it in one line and keep running.
Each module defines its own subclasses next to the code that raises them.
"""


class FleetlearnError(Exception):
    """Base class for errors caused by input, configuration or peers, never by a bug."""


class ConfigError(FleetlearnError, ValueError):
    """A configuration value is invalid; the message names the parameter."""
