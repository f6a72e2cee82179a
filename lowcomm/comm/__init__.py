"""Everything that moves bytes: the transport protocol and its implementations."""

from __future__ import annotations

import os

from .base import ByteLedger, CommError, CommTimeout, Handle, PeerLost, Transport, check_transport
from .local import Fault, LocalTransport, LocalWorld, run_local

__all__ = ["ByteLedger", "CommError", "CommTimeout", "Fault", "Handle", "LocalTransport", "LocalWorld",
           "PeerLost", "Transport", "check_transport", "connect", "run_local"]


def connect(replica_size: int = 1, **kwargs) -> Transport:
    """Pick a transport from the environment.

    * ``LOWCOMM_COORDINATOR`` set: the ZeroMQ peer transport (volunteer / internet runs).
    * torchrun variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``): torch.distributed, the world
      split into replicas of ``replica_size`` ranks (ranks inside a replica do ordinary data
      parallelism; rank r of every replica syncs with rank r of the others).
    * neither: a world of one, which runs the full code path.
    """
    if not isinstance(replica_size, int) or isinstance(replica_size, bool) or replica_size < 1:
        raise ValueError(f"replica_size must be an integer >= 1 (ranks per replica), got {replica_size!r}")
    if os.environ.get("LOWCOMM_COORDINATOR"):
        from .zmq import connect_zmq  # noqa: PLC0415 - optional heavy import

        return connect_zmq(os.environ["LOWCOMM_COORDINATOR"], **kwargs)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .torchdist import TorchDistTransport  # noqa: PLC0415

        return TorchDistTransport.from_env(replica_size=replica_size, **kwargs)
    if replica_size != 1:
        raise ValueError(f"replica_size={replica_size} needs a torchrun launch; standalone runs are a world of one")
    return LocalTransport(LocalWorld(1), 0, **kwargs)
