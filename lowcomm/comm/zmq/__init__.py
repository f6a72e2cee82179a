"""The ZeroMQ transport for internet-spanning runs: coordinator, peers, wire format, security.

See :mod:`lowcomm.comm.zmq.peer` (the transport), :mod:`lowcomm.comm.zmq.coordinator`,
:mod:`lowcomm.comm.zmq.wire` (the wire format, frame by frame) and
:mod:`lowcomm.comm.zmq.security` (CurveZMQ keys and allowlists).
"""

from .coordinator import Coordinator
from .coordinator_cli import run_coordinator
from .peer import BadPayload, ZmqTransport, connect_zmq
from .security import CurveConfig, generate_keypair, load_allowlist
from .wire import WireError

__all__ = ["BadPayload", "Coordinator", "CurveConfig", "WireError", "ZmqTransport", "connect_zmq",
           "generate_keypair", "load_allowlist", "run_coordinator"]
