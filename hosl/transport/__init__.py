"""How the client and server halves talk: messages, links (in-process or torch.distributed), faults.

Knows nothing of ZO or of models: a phase is an opaque small integer, a payload is int64s,
float64s and tensors. See docs/transport.md.
"""

from hosl.transport.link import (
    ConfigMismatchError,
    Handler,
    InProcessLink,
    Link,
    PeerError,
    PeerLostError,
    PeerShutdownError,
    RemoteError,
)
from hosl.transport.wire import PROTOCOL_VERSION, Kind, Message, ShutdownCode, message_nbytes

__all__ = [
    "ConfigMismatchError", "Handler", "InProcessLink", "Kind", "Link", "Message", "PROTOCOL_VERSION", "PeerError",
    "PeerLostError", "PeerShutdownError", "RemoteError", "ShutdownCode", "message_nbytes",
]
