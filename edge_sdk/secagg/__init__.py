"""SecAgg+ primitives and the client state machine (the device role).

The device-side entry points; the protocol is described in docs/protocol.md.
"""

from edge_sdk.secagg.client import ClientConfig, ClientState, handle_client, start_client, tick_client
from edge_sdk.secagg.codec import decode, encode, session_id_of
from edge_sdk.secagg.keys import AgreementKey, IdentityKey
from edge_sdk.secagg.masking import mask_vector
from edge_sdk.secagg.messages import Stage
from edge_sdk.secagg.parameters import SecAggParameters, choose_parameters
from edge_sdk.secagg.vector_layout import VectorLayout

__all__ = [
    "AgreementKey",
    "ClientConfig",
    "ClientState",
    "IdentityKey",
    "SecAggParameters",
    "Stage",
    "VectorLayout",
    "choose_parameters",
    "decode",
    "encode",
    "handle_client",
    "mask_vector",
    "session_id_of",
    "start_client",
    "tick_client",
]
