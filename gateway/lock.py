"""One gateway per buffer: an exclusive lock on a sidecar ``<buffer>.lock`` file.

Two gateways on one buffer fight over its rows (``UNIQUE constraint failed``), over its cursors
and over one MQTT client id, and both send the same readings. So a writable
:class:`~gateway.buffer.Buffer` holds ``flock(LOCK_EX | LOCK_NB)`` on ``<buffer>.lock`` for its
whole life and writes its pid into the file; a second one refuses to start with
:class:`~gateway.errors.BufferLocked`, naming the file and that pid. A read-only buffer
(``gateway status`` beside a running gateway) takes no lock.

- The kernel drops the lock when its holder dies, even by ``kill -9``: a lock file left behind
  never blocks a restart. The file itself is never deleted (deleting it while another process
  waits to open it would let two processes lock two different files).
- Inside one process the lock is shared: a second ``Buffer`` of the same file (a test that
  simulates a crash by reopening) counts one more holder, and the lock goes when the last one
  releases it. The lock keeps out other processes.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from gateway.errors import BufferError, BufferLocked

# Locks this process holds, by the lock file's (device, inode): [file descriptor, holders].
_held: dict[tuple[int, int], list[int]] = {}
_guard = threading.Lock()


def lock_path(buffer_path: str | Path) -> Path:
    """The lock file of the buffer at ``buffer_path``."""
    return Path(f"{buffer_path}.lock")


def _parse_pid(data: bytes) -> int | None:
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class BufferLock:
    """The exclusive lock on ``<buffer_path>.lock``, taken when it is made (non-blocking).

    Raises :class:`~gateway.errors.BufferLocked` when another process holds it. Use it as a
    context manager, or call :meth:`release` once.
    """

    def __init__(self, buffer_path: str | Path):
        self.buffer_path = Path(buffer_path)
        self.path = lock_path(buffer_path)
        self._key: tuple[int, int] | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BufferError(f"{self.path}: cannot open the buffer's lock file: {exc.strerror}") from exc
        with _guard:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            held = _held.get(key)
            if held is not None:  # this process holds it already: one more holder
                os.close(fd)
                held[1] += 1
                self._key = key
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _parse_pid(os.pread(fd, 32, 0))
                os.close(fd)
                raise BufferLocked(self.buffer_path, self.path, pid) from None
            except OSError as exc:
                os.close(fd)
                raise BufferError(f"{self.path}: cannot lock the buffer: {exc.strerror}") from exc
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            _held[key] = [fd, 1]
            self._key = key

    def release(self) -> None:
        """Give the lock up (the last holder in this process unlocks the file). Idempotent."""
        with _guard:
            key, self._key = self._key, None
            if key is None:
                return
            held = _held[key]
            held[1] -= 1
            if held[1] == 0:
                del _held[key]
                os.close(held[0])  # closing the descriptor drops the flock

    def __enter__(self) -> "BufferLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
