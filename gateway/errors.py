"""Every error the gateway raises on purpose.

    GatewayError                 base of everything below
    ├── ConfigError              a configuration that must not start the gateway
    ├── BufferError              the SQLite buffer
    │   ├── BufferFull           the byte budget is used and the policy is reject-newest:
    │   │                        the source waits (its position stays) or counts what it drops
    │   ├── DiskFull             the disk under the buffer is full (transient)
    │   ├── BufferBusy           "database is locked" after the busy timeout (transient)
    │   ├── BufferCorrupt        the buffer file is damaged: `gateway buffer recover`
    │   ├── BufferLocked         another gateway holds the buffer's lock file (one gateway per buffer)
    │   └── SchemaError          the buffer file was written by a newer gateway
    ├── PublishError             a message could not be delivered
    │   ├── RetryableError       try again later (connection down, timeout)
    │   ├── NotAuthorizedError   the broker refused the topic (PUBACK NOT_AUTHORIZED): the
    │   │                        thing's policy is wrong, not the message; keep it, retry slowly
    │   └── UndeliverableError   never deliverable (oversize, bad topic): quarantine it
    ├── ModelError               a model that cannot be loaded, checked or swapped in
    └── BrokerError              the local mosquitto or its certificates (demo, tests, bench)

Lower-level errors (sqlite3, awscrt, onnxruntime, yaml) are mapped to the most specific
of these with ``raise ... from exc`` where they cross a seam.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of the gateway's errors."""


class ConfigError(GatewayError):
    """A configuration problem, named by its key path.

    ``str(err)`` reads ``sources[1].speed: -3 must be > 0``.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass; each is listed."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        GatewayError.__init__(self, "\n".join(str(e) for e in errors))
        self.path = errors[0].path if errors else ""
        self.message = str(self)


class BufferError(GatewayError):  # noqa: A001 - shadows the builtin on purpose, inside this module only
    """A problem with the SQLite buffer."""


class BufferFull(BufferError):
    """The byte budget is used and the policy is to reject the newest readings."""


class DiskFull(BufferError):
    """The disk under the buffer is full; nothing was stored, and a retry may succeed."""


class BufferBusy(BufferError):
    """Another connection held the buffer past the busy timeout; a retry may succeed."""


class BufferCorrupt(BufferError):
    """The buffer file is damaged; ``gateway buffer recover`` salvages what is readable."""


class BufferLocked(BufferError):
    """Another process holds the buffer's lock file: one buffer serves one gateway at a time.

    ``pid`` is the holder's, as written in the lock file (None when it could not be read).
    """

    def __init__(self, buffer_path, lock_path, pid: int | None):
        self.buffer_path, self.lock_path, self.pid = buffer_path, lock_path, pid
        holder = f"pid {pid} holds {lock_path}" if pid is not None else f"another process holds {lock_path}"
        super().__init__(f"{buffer_path} is in use by another gateway ({holder}); "
                         "stop it first: one buffer serves one gateway at a time")


class SchemaError(BufferError):
    """The buffer's schema is newer than this gateway knows."""


class PublishError(GatewayError):
    """A message could not be delivered."""


class RetryableError(PublishError):
    """Delivery failed for now: connection down, broker refused, timeout."""


class NotAuthorizedError(PublishError):
    """The broker refused the topic (PUBACK NOT_AUTHORIZED): a configuration fault.

    IoT Core answers it when the thing's policy does not allow the topic. Every message to that
    topic gets the same answer until a person fixes the policy, so the forwarder keeps the
    readings, stops sending and retries slowly instead of quarantining the backlog.
    """


class UndeliverableError(PublishError):
    """The message can never be delivered as it is (oversize, invalid topic)."""


class ModelError(GatewayError):
    """A model that cannot be loaded, verified or swapped in."""


class BrokerError(GatewayError):
    """The local broker (mosquitto) or its certificates could not be set up."""
