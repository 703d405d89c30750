"""CURVE authentication and encryption for the run's ZeroMQ sockets.

Sockets bind to loopback by default. Binding any other address (`run.bind_host`) needs
`run.curve_keys`: a directory made by `async-rl keys DIR` holding a server and a client key pair
in ZeroMQ's certificate format (text, never unpickled), secret files with 0600 permissions.
Services encrypt with the server key and accept only clients that present the client key;
every refused client is counted (`buffer/auth_denied`). Copy the directory to every machine of
the run over a channel you trust.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


def create_keys(directory: str | Path) -> Path:
    """Generate the run's server and client key pairs in `directory` (created 0700)."""
    directory = Path(directory)
    if any((directory / name).exists() for name in KEY_FILES):
        raise ValueError(f"{directory} already holds keys; remove them first to make new ones")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in ("server", "client"):
        zmq.auth.create_certificates(str(directory), name)
    for name in KEY_FILES:
        os.chmod(directory / name, 0o600 if name.endswith("_secret") else 0o644)
    return directory


def check_keys(directory: str | Path) -> None:
    """Raise ValueError unless `directory` holds readable keys with private secret files."""
    directory = Path(directory)
    for name in KEY_FILES:
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path} is missing; make keys with `async-rl keys {directory}`")
        if name.endswith("_secret") and stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ValueError(f"{path} is readable by other users; run `chmod 600 {path}`")


class _AllowClientKey:
    def __init__(self, allowed: bytes):
        self.allowed, self.denied = allowed, 0
        self.lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.allowed:
            return True
        with self.lock:
            self.denied += 1
        return False


class Curve:
    """The run's keys; `serve()` and `connect()` set a socket up for its side."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        check_keys(directory)
        try:
            self.server_public, self.server_secret = zmq.auth.load_certificate(
                directory / "server.key_secret"
            )
            self.client_public, self.client_secret = zmq.auth.load_certificate(
                directory / "client.key_secret"
            )
        except (ValueError, OSError) as e:
            raise ValueError(f"{directory}: unreadable key files ({e})") from None
        self._auth: dict[int, tuple[ThreadAuthenticator, _AllowClientKey]] = {}

    def serve(self, socket: zmq.Socket) -> None:
        """Server side: encrypt, and let the context's authenticator check clients."""
        ctx = socket.context
        if id(ctx) not in self._auth:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            allow = _AllowClientKey(self.client_public)
            auth.configure_curve_callback("*", credentials_provider=allow)
            self._auth[id(ctx)] = (auth, allow)
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True

    def connect(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret

    @property
    def denied(self) -> int:
        return sum(allow.denied for _, allow in self._auth.values())

    def stop(self) -> None:
        for auth, _ in self._auth.values():
            auth.stop()
        self._auth.clear()


def curve_for(cfg) -> Curve | None:
    """The run's `Curve`, or None when `run.curve_keys` is empty (loopback only)."""
    return Curve(cfg.run.curve_keys) if cfg.run.curve_keys else None
