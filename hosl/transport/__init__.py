"""How the client and server halves talk: messages, links (in-process or torch.distributed), faults.

Knows nothing of ZO or of models: a phase is an opaque small integer, a payload is int64s,
float64s and tensors. See docs/transport.md.
"""

from hosl.transport.auth import SECRET_ENV, AuthError, ConnectError
from hosl.transport.link import (
    ConfigMismatchError,
    Handler,
    HandlerError,
    InProcessLink,
    Link,
    PeerError,
    PeerLostError,
    PeerProtocolError,
    PeerShutdownError,
    RemoteError,
)
from hosl.transport.session import TamperedMessageError
from hosl.transport.wire import PROTOCOL_VERSION, Kind, Message, ShutdownCode, message_nbytes

__all__ = [
    "AuthError",
    "ConnectError",
    "SECRET_ENV",
    "ConfigMismatchError",
    "Handler",
    "HandlerError",
    "InProcessLink",
    "Kind",
    "Link",
    "Message",
    "PROTOCOL_VERSION",
    "PeerError",
    "PeerLostError",
    "PeerProtocolError",
    "PeerShutdownError",
    "RemoteError",
    "ShutdownCode",
    "TamperedMessageError",
    "message_nbytes",
]
