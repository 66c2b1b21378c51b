"""A secret kept in a file and re-read when the file changes: INTERAKT_API_KEY_FILE.

So the Interakt key is rotated without a restart: write the new key to the file (or let a
mounted Kubernetes Secret change it) and sends use it within a second. Unlike the caller tokens
file, a file that cannot be read or is empty keeps the last key that was read (with an ERROR):
a send with the old key may still work, a send with no key cannot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from otp_service.config import read_api_key_file

log = logging.getLogger(__name__)

# A changed file is read within this long; a stat per send would cost a system call for nothing.
RELOAD_INTERVAL_SECONDS = 1.0


class KeyFile:
    """The key in ``path``, re-read when the file changes; ``key`` is what start-up read."""

    def __init__(self, path: str, key: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._key = key
        self._clock = clock
        self._version = self._stat()
        self._next_check = clock() + RELOAD_INTERVAL_SECONDS

    def current(self) -> str:
        """The key to use now."""
        if self._clock() >= self._next_check:
            self._reload()
        return self._key

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _reload(self) -> None:
        self._next_check = self._clock() + RELOAD_INTERVAL_SECONDS
        version = self._stat()
        if version == self._version and version is not None:
            return
        try:
            key = read_api_key_file(self._path)
        except OSError as exc:
            key, why = "", f"cannot be read ({type(exc).__name__})"
        else:
            why = "is empty"
        if not key:
            self._version = None  # read it again at the next check, and say so again
            log.error(
                "Interakt key file %s %s: sends keep the key read before",
                self._path,
                why,
                extra={"event": "api_key_file_unreadable"},
            )
            return
        self._version = version
        if key != self._key:
            self._key = key
            log.warning(
                "Interakt key file %s changed: sends use the new key",
                self._path,
                extra={"event": "api_key_reloaded"},
            )
