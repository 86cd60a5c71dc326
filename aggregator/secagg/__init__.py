"""SecAgg+ server state machine and the in-memory driver (the aggregator role)."""

from aggregator.secagg.driver import Fleet, SessionOutcome, run_session
from aggregator.secagg.server import ServerConfig, ServerState, handle_server, start_server, tick_server
from aggregator.secagg.unmask import UnmaskInputs, reconstruct_sum

__all__ = [
    "Fleet",
    "ServerConfig",
    "ServerState",
    "SessionOutcome",
    "UnmaskInputs",
    "handle_server",
    "reconstruct_sum",
    "run_session",
    "start_server",
    "tick_server",
]
