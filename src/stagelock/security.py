"""CURVE security for both sockets: keys, authentication, the loopback rule.

ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 key exchange, every message
encrypted and authenticated) with pyzmq's :mod:`zmq.auth`: the daemon's PUB and
REP sockets are CURVE *servers* holding the server's secret key, a
:class:`zmq.auth.thread.ThreadAuthenticator` (ZAP) admits only the client public
keys in ``authorized_clients/``, and ``ctl``/``monitor`` are CURVE *clients* that
know the server's public key and hold a client key pair. A client without keys,
or with a key not authorised, completes no handshake: it receives nothing and
its requests are never seen by the daemon.

Key directory (``stagelock keys generate DIR``, pyzmq's certificate format)::

    DIR/server.key                   the server's public certificate (share it)
    DIR/server.key_secret            the server's key pair (0600, daemon only)
    DIR/client.key                   a client's public certificate
    DIR/client.key_secret            its key pair (0600, copy to the client)
    DIR/authorized_clients/*.key     public keys the daemon admits

The daemon needs ``server.key_secret`` and ``authorized_clients/``; a client
needs ``server.key`` and its ``*.key_secret``. Binding a socket to an address
other than loopback without keys is refused (:func:`check_exposure`) unless
``security.insecure`` says so.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq
    import zmq.auth.thread

    from stagelock.config import Config

__all__ = [
    "ClientKeys",
    "KeyFiles",
    "SecurityError",
    "ServerKeys",
    "check_exposure",
    "generate_keys",
    "is_loopback",
    "load_client_keys",
    "load_server_keys",
    "start_authenticator",
]

logger = logging.getLogger("stagelock.security")

SERVER = "server"
AUTHORIZED = "authorized_clients"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SecurityError(ValueError):
    """Keys missing or invalid, or an exposed socket without keys; one line."""


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """What :func:`generate_keys` wrote (paths; None for what already existed)."""

    directory: Path
    server_public: Path | None
    server_secret: Path | None
    client_public: Path
    client_secret: Path
    authorized: Path


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """The daemon's side: its key pair and the directory of admitted clients."""

    public: bytes
    secret: bytes
    authorized_dir: Path

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server (call before ``bind``)."""
        import zmq

        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A client's side: the server's public key and the client's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the server (call before ``connect``)."""
        import zmq

        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def generate_keys(directory: str | Path, *, client: str = "client") -> KeyFiles:
    """Write server and client certificates into ``directory``.

    The server's pair is created when absent (an existing one is kept, so more
    clients can be added to a running setup); the client's pair is always new,
    and its public key is authorised (copied to ``authorized_clients/``).

    Parameters
    ----------
    directory : str or Path
        Created (mode 0700) if missing.
    client : str
        Name of the client's files (``<client>.key``, ``<client>.key_secret``).

    Returns
    -------
    KeyFiles

    Raises
    ------
    SecurityError
        When the client's files exist already, the name is not a plain file
        name, or the directory cannot be written.
    """
    import zmq.auth

    if not _NAME.match(client) or client == SERVER:
        raise SecurityError(
            f"client name {client!r}: use letters, digits, '_', '-', '.' "
            f"(and not {SERVER!r})"
        )
    out = Path(directory)
    authorized = out / AUTHORIZED
    client_secret = out / f"{client}.key_secret"
    if client_secret.exists() or (out / f"{client}.key").exists():
        raise SecurityError(
            f"{out}: keys of client {client!r} exist already; choose another "
            "--client NAME (or delete them to replace them)"
        )
    old_umask = os.umask(0o077)  # secret files are born 0600, never readable
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized.mkdir(mode=0o700, exist_ok=True)
        server_public = server_secret = None
        if not (out / f"{SERVER}.key_secret").exists():
            pub, sec = zmq.auth.create_certificates(out, SERVER)
            server_public, server_secret = Path(pub), Path(sec)
        pub, sec = zmq.auth.create_certificates(out, client)
        shutil.copyfile(pub, authorized / f"{client}.key")
    except OSError as exc:
        raise SecurityError(f"{out}: cannot write keys: {exc}") from None
    finally:
        os.umask(old_umask)
    # public certificates are meant to be shared; secrets stay 0600
    for public in (server_public, Path(pub), authorized / f"{client}.key"):
        if public is not None:
            public.chmod(0o644)
    for secret in (server_secret, Path(sec)):
        if secret is not None:
            secret.chmod(0o600)
    return KeyFiles(
        directory=out,
        server_public=server_public,
        server_secret=server_secret,
        client_public=Path(pub),
        client_secret=Path(sec),
        authorized=authorized / f"{client}.key",
    )


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"--keys: {path}: {exc}") from None
    if secret and sec is None:
        raise SecurityError(f"--keys: {path} holds no secret key")
    return public, sec


def _missing(path: Path, what: str) -> SecurityError:
    return SecurityError(
        f"--keys: {path} is missing ({what}); write keys with "
        "'stagelock keys generate DIR'"
    )


def load_server_keys(directory: str | Path) -> ServerKeys:
    """Read the daemon's keys from a key directory.

    Raises
    ------
    SecurityError
        When ``server.key_secret`` is missing or invalid, or no client is
        authorised.
    """
    d = Path(directory)
    secret_file = d / f"{SERVER}.key_secret"
    if not secret_file.is_file():
        raise _missing(secret_file, "the server's secret key")
    public, secret = _load(secret_file, secret=True)
    assert secret is not None
    authorized = d / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise _missing(authorized / "*.key", "the public keys of admitted clients")
    for key in authorized.glob("*.key"):
        _load(key, secret=False)  # an invalid one is an error now, not a mystery
    return ServerKeys(public=public, secret=secret, authorized_dir=authorized)


def load_client_keys(directory: str | Path) -> ClientKeys:
    """Read a client's keys: ``server.key`` and ``client.key_secret``.

    Without ``client.key_secret``, the one other ``*.key_secret`` in the
    directory is used (a client generated with another name).

    Raises
    ------
    SecurityError
        When a file is missing, ambiguous or invalid.
    """
    d = Path(directory)
    server_file = d / f"{SERVER}.key"
    if not server_file.is_file():
        raise _missing(server_file, "the server's public key")
    server_public, _ = _load(server_file, secret=False)
    client_file = d / "client.key_secret"
    if not client_file.is_file():
        others = sorted(
            p for p in d.glob("*.key_secret") if p.name != f"{SERVER}.key_secret"
        )
        if len(others) != 1:
            raise SecurityError(
                f"--keys: {d} holds {len(others)} client secret keys and no "
                "client.key_secret; keep exactly one"
                if others
                else f"--keys: {d}/client.key_secret is missing (the client's key "
                "pair); copy it from the machine that ran 'stagelock keys generate'"
            )
        client_file = others[0]
    public, secret = _load(client_file, secret=True)
    assert secret is not None
    return ClientKeys(server_public=server_public, public=public, secret=secret)


def start_authenticator(
    keys: ServerKeys, context: zmq.Context[Any] | None = None
) -> zmq.auth.thread.ThreadAuthenticator:
    """Start the ZAP handler admitting only the authorised client keys.

    Must run before the CURVE server sockets bind (a connection handshaking
    before it exists would be admitted by any valid key). One per context.

    Returns
    -------
    ThreadAuthenticator
        Stop it (``.stop()``) after closing the sockets.
    """
    import zmq
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(
        context or zmq.Context.instance(), log=logging.getLogger("stagelock.zap")
    )
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


_LOOPBACK_NAMES = {"localhost", "lo", "lo0", "ip6-localhost"}


def is_loopback(endpoint: str) -> bool:
    """Whether binding ``endpoint`` keeps the socket on this machine.

    ``ipc://`` and ``inproc://`` are local; ``tcp://`` is local for 127.0.0.0/8,
    ``::1``, ``localhost`` and the ``lo`` interface; ``*``, ``0.0.0.0``, any other
    address or interface name is reachable from the network.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme not in ("tcp", "ws", "wss"):
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: Config) -> None:
    """Refuse a socket reachable from the network without keys.

    With ``security.insecure`` such a binding is allowed with a warning.

    Raises
    ------
    SecurityError
        One line naming the key, the endpoint, ``--keys`` and ``--insecure``.
    """
    if config.security.keys_dir is not None:
        return
    sockets = (
        ("publish.endpoint", config.publish.endpoint, "read every measurement"),
        (
            "control.endpoint",
            config.control.endpoint,
            "pause, rereference or stop the daemon",
        ),
    )
    for key, endpoint, harm in sockets:
        if is_loopback(endpoint):
            continue
        if config.security.insecure:
            logger.warning(
                "%s %s is reachable from the network without keys: anyone who "
                "can reach it can %s (--insecure)",
                key,
                endpoint,
                harm,
            )
            continue
        raise SecurityError(
            f"{key} {endpoint} is not a loopback address: anyone who can reach "
            f"it could {harm}; secure it with --keys DIR (write them with "
            "'stagelock keys generate DIR'), or allow it with --insecure"
        )
