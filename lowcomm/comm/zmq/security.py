"""CurveZMQ keys and allowlists (RFC 26, CurveZMQ: Curve25519 handshake, encrypted and
authenticated connections).

Every peer and the coordinator own a key pair. ``lowcomm keygen --out DIR --name NAME``
writes ``NAME.key`` (public, safe to share) and ``NAME.key_secret`` (keep private) in
ZeroMQ's certificate format. A run's allowlist is a directory of public ``.key`` files (or a
list of Z85 public keys): every server socket (the coordinator's ROUTER and each peer's
ROUTER) runs a ZAP handler that refuses a client whose public key is not on it, so an
unauthenticated or unlisted peer never gets a message through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["CurveConfig", "generate_keypair", "load_allowlist"]

log = logging.getLogger(__name__)


def generate_keypair(out_dir: str, name: str) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` under ``out_dir``; returns their paths."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"key name must be a plain file name, got {name!r}")
    os.makedirs(out_dir, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(out_dir, name)
    os.chmod(sec, 0o600)
    return pub, sec


def load_allowlist(allow: str | Iterable[str]) -> set[bytes]:
    """Z85 public keys from a directory of ``*.key`` files, one ``.key`` file, or an iterable of keys."""
    keys: set[bytes] = set()
    if isinstance(allow, str):
        if os.path.isdir(allow):
            for fn in sorted(os.listdir(allow)):
                if fn.endswith(".key"):
                    pub, _ = zmq.auth.load_certificate(os.path.join(allow, fn))
                    keys.add(pub)
        elif os.path.isfile(allow):
            pub, _ = zmq.auth.load_certificate(allow)
            keys.add(pub)
        else:
            raise ValueError(f"allowlist {allow!r} is neither a directory of .key files nor a .key file")
    else:
        for k in allow:
            kb = k.encode() if isinstance(k, str) else bytes(k)
            if len(kb) != 40:
                raise ValueError(f"a Z85 public key is 40 characters, got {len(kb)}")
            keys.add(kb)
    if not keys:
        raise ValueError(f"allowlist {allow!r} holds no public keys; create them with `lowcomm keygen`")
    return keys


class _Allow:
    """ZAP credentials provider: accept exactly the listed public keys, log every refusal."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            log.warning("refused a CURVE client with unlisted public key %s", key.decode(errors="replace"))
        return ok


@dataclass
class CurveConfig:
    """This process's key pair and the allowlist it enforces.

    Args:
        secret_key_file: this process's ``NAME.key_secret`` (from ``lowcomm keygen``).
        allow: directory of public ``.key`` files (or list of Z85 keys) allowed to connect.
        server_key: the coordinator's public key (Z85 str, or a ``.key`` file); peers need it.
    """

    secret_key_file: str
    allow: str | list[str]
    server_key: str | None = None
    public: bytes = field(init=False, default=b"")
    secret: bytes = field(init=False, default=b"")
    allowed: set[bytes] = field(init=False, default_factory=set)
    coordinator_public: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not os.path.isfile(self.secret_key_file):
            raise ValueError(f"secret key file {self.secret_key_file!r} not found; create one with "
                             f"`lowcomm keygen --out DIR --name NAME`")
        pub, sec = zmq.auth.load_certificate(self.secret_key_file)
        if sec is None:
            raise ValueError(f"{self.secret_key_file!r} holds no secret key (pass the .key_secret file)")
        self.public, self.secret = pub, sec
        self.allowed = load_allowlist(self.allow)
        if self.server_key is not None:
            if os.path.isfile(self.server_key):
                self.coordinator_public = zmq.auth.load_certificate(self.server_key)[0]
            else:
                self.coordinator_public = self.server_key.encode()
                if len(self.coordinator_public) != 40:
                    raise ValueError("server_key must be a 40-character Z85 public key or a .key file")

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """A ZAP handler on ``ctx`` that enforces the allowlist (one per context)."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("lowcomm.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_Allow(self.allowed))
        return auth

    def make_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def make_client(self, sock: zmq.Socket, server_public: bytes) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server_public


def add_arguments(ap) -> None:
    """Arguments of ``lowcomm keygen``."""
    ap.add_argument("--out", required=True, help="directory to write the key pair into")
    ap.add_argument("--name", required=True, help="file name stem: NAME.key (public) and NAME.key_secret")


def main(args) -> int:
    """Run ``lowcomm keygen``: write a CURVE key pair; share NAME.key, keep NAME.key_secret private."""
    pub, sec = generate_keypair(args.out, args.name)
    print(f"public key: {pub}\nsecret key: {sec} (keep private; copy {os.path.basename(pub)} into the run's "
          f"allowlist directory)")
    return 0
