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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

__all__ = ["CurveConfig", "Rejects", "check_insecure", "generate_keypair", "load_allowlist"]

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
    return set(allowlist_names(allow))


def allowlist_names(allow: str | Iterable[str]) -> dict[bytes, str]:
    """Z85 public key -> its name: the ``.key`` file's stem, or a key given as a string by its first 8 characters."""
    keys: dict[bytes, str] = {}
    if isinstance(allow, str):
        if os.path.isdir(allow):
            for fn in sorted(os.listdir(allow)):
                if fn.endswith(".key"):
                    pub, _ = zmq.auth.load_certificate(os.path.join(allow, fn))
                    keys[pub] = fn[:-4]
        elif os.path.isfile(allow):
            pub, _ = zmq.auth.load_certificate(allow)
            keys[pub] = os.path.basename(allow)[:-4] if allow.endswith(".key") else os.path.basename(allow)
        else:
            raise ValueError(f"allowlist {allow!r} is neither a directory of .key files nor a .key file")
    else:
        for k in allow:
            kb = k.encode() if isinstance(k, str) else bytes(k)
            if len(kb) != 40:
                raise ValueError(f"a Z85 public key is 40 characters, got {len(kb)}")
            keys[kb] = kb[:8].decode(errors="replace")
    if not keys:
        raise ValueError(f"allowlist {allow!r} holds no public keys; create them with `lowcomm keygen`")
    return keys


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (loopback TCP, ipc, inproc)."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def check_insecure(what: str, endpoints: Iterable[str | None], curve: Any, insecure: bool) -> None:
    """Without CURVE the network is trusted: refuse a non-loopback endpoint unless ``insecure`` says so."""
    if curve is not None or insecure:
        return
    bad = [e for e in endpoints if e and not is_loopback(e)]
    if bad:
        raise ValueError(f"{what}: {bad[0]} is reachable from other machines, but CURVE is off, so anyone who can "
                         f"reach it could impersonate members, forge votes and read the model. Turn CURVE on "
                         f"(keys from `lowcomm keygen`), or pass insecure=True / --insecure if the network itself "
                         f"is trusted (a lab, a private cluster)")


class Rejects:
    """Messages dropped per sender, counted, and logged at most once per ``every`` seconds per sender.

    Senders are named by :meth:`CurveConfig.name` (a key's allowlist name) or a routing id in hex;
    at most ``max_names`` names are tracked (the oldest forgotten), so an attacker cannot grow it.
    """

    def __init__(self, logger: logging.Logger, every: float = 5.0, max_names: int = 1024):
        self.log, self.every, self.max_names = logger, every, max_names
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self.total = 0

    def __call__(self, name: str, why: str) -> None:
        self.total += 1
        self.counts[name] = self.counts.get(name, 0) + 1
        if len(self.counts) > self.max_names:
            old = next(iter(self.counts))
            self.counts.pop(old)
            self._last.pop(old, None)
        now = time.monotonic()
        if now - self._last.get(name, -1e9) >= self.every:
            self._last[name] = now
            self.log.warning("dropped a message from %s (%d so far): %s", name, self.counts[name], why[:300])


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
    names: dict[bytes, str] = field(init=False, default_factory=dict)
    coordinator_public: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not os.path.isfile(self.secret_key_file):
            raise ValueError(f"secret key file {self.secret_key_file!r} not found; create one with "
                             f"`lowcomm keygen --out DIR --name NAME`")
        pub, sec = zmq.auth.load_certificate(self.secret_key_file)
        if sec is None:
            raise ValueError(f"{self.secret_key_file!r} holds no secret key (pass the .key_secret file)")
        self.public, self.secret = pub, sec
        self.names = allowlist_names(self.allow)
        self.allowed = set(self.names)
        if self.server_key is not None:
            if os.path.isfile(self.server_key):
                self.coordinator_public = zmq.auth.load_certificate(self.server_key)[0]
            else:
                self.coordinator_public = self.server_key.encode()
                if len(self.coordinator_public) != 40:
                    raise ValueError("server_key must be a 40-character Z85 public key or a .key file")

    def name(self, key: str | bytes | None) -> str:
        """How logs name a key: its allowlist file's stem (or first 8 Z85 characters)."""
        if key is None:
            return "an unauthenticated sender"
        kb = key.encode() if isinstance(key, str) else key
        return f"key {self.names.get(kb, kb[:8].decode(errors='replace'))!r}"

    def reload(self) -> set[bytes]:
        """Re-read the allowlist (``lowcomm coordinator`` does on SIGHUP); returns the keys removed.

        The set the ZAP handler checks is updated in place, so new connections see it at once."""
        names = allowlist_names(self.allow)
        removed = set(self.allowed) - set(names)
        self.allowed.clear()
        self.allowed.update(names)
        self.names.update(names)
        return removed

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
