"""meshnode's pure protocol layer: no I/O, no clock reads, no global randomness.

State machines take ``now`` and a ``random.Random`` from their caller and
return the messages to send, so ``sim`` runs the same code the daemon runs.
"""

from __future__ import annotations

from .catalog import Catalog
from .errors import InvalidName, LocalProtocolError, ProtocolError, RemoteProtocolError
from .gossip import GossipConfig, GossipNode, Send
from .hlc import HLC, ClockSkewError, Stamp
from .keys import copy_key, loc_key, reg_key
from .names import Device, parse_device, validate_model_name, validate_node_id
from .view import ModelView, resolve_models
from .wire import Envelope, MemberRecord, MemberState, decode, encode

__all__ = [
    "HLC",
    "Catalog",
    "ClockSkewError",
    "Device",
    "Envelope",
    "GossipConfig",
    "GossipNode",
    "InvalidName",
    "LocalProtocolError",
    "MemberRecord",
    "MemberState",
    "ModelView",
    "ProtocolError",
    "RemoteProtocolError",
    "Send",
    "Stamp",
    "copy_key",
    "decode",
    "encode",
    "loc_key",
    "parse_device",
    "reg_key",
    "resolve_models",
    "validate_model_name",
    "validate_node_id",
]
