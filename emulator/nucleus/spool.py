"""The spooler: where the local nucleus keeps messages for IoT Core until the broker takes them.

It behaves as the Greengrass nucleus's own spooler does (``com.aws.greengrass.mqttclient.spool``,
configured under ``services.aws.greengrass.Nucleus.configuration.mqtt.spooler``)::

    spool = Spool(SpoolConfig())            # in memory, 2.5 MiB
    mid = spool.add("dt/x", b"...", qos=1)  # raises SpoolFull when it does not fit
    msg = spool.pop()                       # the oldest queued message, now in flight
    spool.remove(msg.id)                    # its PUBACK came
    spool.requeue(msg.id, max_retry=100)    # or: it failed; first in line again

Settings (:class:`SpoolConfig`, with the nucleus's keys and defaults)
----------------------------------------------------------------------
* ``storageType`` ``Memory`` (default) or ``Disk``. Disk keeps every message in a SQLite file,
  so what was spooled and not yet acknowledged survives a restart of the nucleus; the real
  nucleus delegates Disk to the ``aws.greengrass.DiskSpooler`` plugin, which also uses SQLite.
* ``maxSizeInBytes`` 2,621,440 (2.5 MiB). Only payload bytes count, as in the nucleus.
* ``keepQos0WhenOffline`` false: offline, a QoS 0 publish is refused and QoS 0 messages still in
  the spool are dropped when the connection goes; QoS 1 is always spooled.

When a message does not fit (as the nucleus's ``Spool.queueCapacityCheck``)
----------------------------------------------------------------------------
* A payload larger than ``maxSizeInBytes`` itself: :class:`SpoolFull`
  ``Message is larger than the size of message spool.``
* Otherwise queued QoS 0 messages are evicted, oldest first, until the new one fits (each counts
  in ``dropped_qos0``); QoS 1 messages are never evicted. If it still does not fit:
  :class:`SpoolFull` ``Message spool is full. Message could not be added.``; what was evicted
  for it stays gone, as in the nucleus. Messages in flight (sent, not yet acknowledged) count
  against the size but are never evicted.

Order: messages leave in the order they were added; a failed one goes back to the front
(``requeue``), so it is the next to go. After ``max_retry`` failed attempts (the nucleus's
``mqtt.maxPublishRetry``, 100; -1 is unlimited) it is dropped and counted in ``dropped_failed``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from gateway.errors import ConfigError, GatewayError

__all__ = ["SpoolConfig", "Spool", "SpoolMessage", "SpoolStats", "SpoolFull", "OfflineQos0Dropped",
           "MessageTooLarge", "DEFAULT_MAX_SIZE_BYTES", "TOO_LARGE_TEXT", "FULL_TEXT", "OFFLINE_QOS0_TEXT"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE_BYTES = int(2.5 * 1024 * 1024)  # 2,621,440, the nucleus's default

# The nucleus's own texts (SpoolerStoreException messages); the IPC server answers
# ServiceError "Publish to topic <topic> failed: <text>" with them, as the nucleus does.
TOO_LARGE_TEXT = "Message is larger than the size of message spool."
FULL_TEXT = "Message spool is full. Message could not be added."
OFFLINE_QOS0_TEXT = "Device is offline. Dropping QoS 0 message."

STORAGE_TYPES = ("Memory", "Disk")


class SpoolFull(GatewayError):
    """The nucleus did not take a message for IoT Core; ``str()`` is the nucleus's own text.

    Raised by ``IotCoreBridge.publish``; the IPC server maps every one of these (and its
    subclasses) to ServiceError ``Publish to topic <topic> failed: <text>``. Itself it means
    the spool has no room: :data:`FULL_TEXT` or :data:`TOO_LARGE_TEXT`.
    """


class OfflineQos0Dropped(SpoolFull):
    """Offline with ``keepQos0WhenOffline`` false, a QoS 0 message is dropped (:data:`OFFLINE_QOS0_TEXT`)."""


class MessageTooLarge(SpoolFull):
    """The payload exceeds ``mqtt.maxMessageSizeInBytes`` (128 KiB), before any spooling."""


@dataclass(frozen=True)
class SpoolConfig:
    """The spooler's settings; see the module doc. ``path`` is the SQLite file for ``Disk``."""

    storage_type: str = "Memory"
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES
    keep_qos0_when_offline: bool = False
    path: Path | None = None

    def __post_init__(self):
        where = "mqtt.spooler"
        if self.storage_type not in STORAGE_TYPES:
            raise ConfigError(f"{where}.storageType", f"{self.storage_type!r} is not one of {', '.join(STORAGE_TYPES)}")
        if type(self.max_size_bytes) is not int or self.max_size_bytes <= 0:
            raise ConfigError(f"{where}.maxSizeInBytes", f"{self.max_size_bytes!r} must be a positive integer")
        if type(self.keep_qos0_when_offline) is not bool:
            raise ConfigError(f"{where}.keepQos0WhenOffline", f"{self.keep_qos0_when_offline!r} must be true or false")
        if self.storage_type == "Disk" and self.path is None:
            raise ConfigError(f"{where}.storageType", "Disk needs a path for the spool's SQLite file")
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def from_nucleus(cls, spooler: Mapping | None, *, path: str | os.PathLike | None = None) -> "SpoolConfig":
        """From the nucleus's ``mqtt.spooler`` mapping (``storageType``, ``maxSizeInBytes``,
        ``keepQos0WhenOffline``); missing keys take the nucleus's defaults."""
        spooler = dict(spooler or {})
        known = {"storageType", "maxSizeInBytes", "keepQos0WhenOffline", "pluginName"}
        unknown = sorted(set(spooler) - known)
        if unknown:
            raise ConfigError(f"mqtt.spooler.{unknown[0]}", f"unknown key; known: {', '.join(sorted(known))}")
        return cls(storage_type=spooler.get("storageType", "Memory"),
                   max_size_bytes=spooler.get("maxSizeInBytes", DEFAULT_MAX_SIZE_BYTES),
                   keep_qos0_when_offline=spooler.get("keepQos0WhenOffline", False),
                   path=Path(path) if path is not None else None)


@dataclass
class SpoolMessage:
    id: int
    topic: str
    qos: int
    payload: bytes
    retried: int = 0
    properties: dict | None = None  # MQTT 5 publish properties, as IotCoreBridge.publish takes them


@dataclass(frozen=True)
class SpoolStats:
    """``messages``/``bytes``: held and not yet acknowledged (queued or in flight); ``bytes`` is
    what counts against ``maxSizeInBytes``. ``dropped_qos0``: QoS 0 messages refused offline,
    dropped at a disconnect or evicted for room. ``dropped_failed``: given up after failing."""

    messages: int
    bytes: int
    queued: int
    in_flight: int
    dropped_qos0: int
    dropped_failed: int


@dataclass
class _Entry:  # what stays in memory for each message, whatever the storage
    topic: str
    qos: int
    size: int
    retried: int = 0
    payload: bytes | None = field(default=None, repr=False)  # None: on disk
    properties: dict | None = None


class Spool:
    """Spooled messages in order, in memory or in SQLite; thread-safe (one lock).

    ``lock`` is a :class:`threading.Condition` the bridge shares for its own state, so that one
    wait covers "connected, room in flight, something queued".
    """

    SCHEMA_VERSION = 1

    def __init__(self, config: SpoolConfig):
        self.config = config
        self.lock = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._queue: collections.deque[int] = collections.deque()  # ids waiting to be sent, oldest first
        self._bytes = 0
        self._next_id = 0
        self.dropped_qos0 = 0
        self.dropped_failed = 0
        self._db: sqlite3.Connection | None = None
        if config.storage_type == "Disk":
            self._open_disk(config.path)

    # -- disk ---------------------------------------------------------------------------------

    def _open_disk(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.SCHEMA_VERSION:
                raise ConfigError("mqtt.spooler.storageType",
                                  f"spool file {path} has schema {version}, newer than this nucleus's "
                                  f"{self.SCHEMA_VERSION}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the process
            db.execute("CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                       "qos INTEGER NOT NULL, payload BLOB NOT NULL, retried INTEGER NOT NULL DEFAULT 0, "
                       "properties TEXT)")
            db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
            rows = db.execute("SELECT id, topic, qos, length(payload), retried, properties FROM spool "
                              "ORDER BY id").fetchall()
        except sqlite3.Error as exc:
            raise ConfigError("mqtt.spooler.storageType", f"cannot open the spool file {path}: {exc}") from exc
        self._db = db
        left = 0
        for mid, topic, qos, size, retried, props in rows:
            self._next_id = max(self._next_id, mid + 1)
            # As the nucleus's persistentQueueSync: what no longer fits is not queued (no eviction).
            if size > self.config.max_size_bytes or self._bytes + size > self.config.max_size_bytes:
                left += 1
                continue
            self._entries[mid] = _Entry(topic, qos, size, retried, properties=_loads(props))
            self._queue.append(mid)
            self._bytes += size
        if rows:
            log.info("spool %s: %d messages (%d bytes) from the last run", path, len(self._queue), self._bytes)
        if left:
            log.warning("spool %s: %d messages from the last run do not fit in maxSizeInBytes %d; they stay in "
                        "the file and are loaded at a later start", path, left, self.config.max_size_bytes)

    def _sql(self, sql: str, args: tuple) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise SpoolFull(f"Disk spooler failed: {exc} ({self.config.path})") from exc

    # -- the contract ---------------------------------------------------------------------------

    def add(self, topic: str, payload: bytes, qos: int, properties: dict | None = None) -> int:
        """Spool a message and return its id; raise :class:`SpoolFull` if it does not fit."""
        size = len(payload)
        limit = self.config.max_size_bytes
        with self.lock:
            if size > limit:
                raise SpoolFull(TOO_LARGE_TEXT)
            if self._bytes + size > limit:
                self._evict_qos0(needed=self._bytes + size - limit)
            if self._bytes + size > limit:
                raise SpoolFull(FULL_TEXT)
            mid = self._next_id
            entry = _Entry(topic, qos, size, properties=properties or None)
            if self._db is not None:
                self._sql("INSERT INTO spool (id, topic, qos, payload, properties) VALUES (?, ?, ?, ?, ?)",
                          (mid, topic, qos, payload, _dumps(entry.properties)))
            else:
                entry.payload = payload
            self._next_id += 1
            self._entries[mid] = entry
            self._queue.append(mid)
            self._bytes += size
            self.lock.notify_all()
            return mid

    def _evict_qos0(self, needed: int | None) -> int:
        """Drop queued QoS 0 messages, oldest first, until ``needed`` bytes are free (None: all)."""
        freed = 0
        kept: collections.deque[int] = collections.deque()
        while self._queue:
            mid = self._queue.popleft()
            if (needed is None or freed < needed) and self._entries[mid].qos == 0:
                freed += self._forget(mid)
                self.dropped_qos0 += 1
            else:
                kept.append(mid)
        self._queue = kept
        return freed

    def drop_qos0(self) -> int:
        """Drop every queued QoS 0 message (the connection went, ``keepQos0WhenOffline`` false)."""
        with self.lock:
            before = self.dropped_qos0
            self._evict_qos0(needed=None)
            return self.dropped_qos0 - before

    def count_dropped_qos0(self) -> None:
        """Count a QoS 0 message refused while offline."""
        with self.lock:
            self.dropped_qos0 += 1

    def has_queued(self) -> bool:
        return bool(self._queue)

    def pop(self) -> SpoolMessage | None:
        """The oldest queued message, taken out of the queue (it is now in flight), or None."""
        with self.lock:
            if not self._queue:
                return None
            mid = self._queue.popleft()
            e = self._entries[mid]
            payload = e.payload
            if payload is None:
                row = self._db.execute("SELECT payload FROM spool WHERE id = ?", (mid,)).fetchone()
                payload = bytes(row[0])
            return SpoolMessage(mid, e.topic, e.qos, payload, e.retried, e.properties)

    def remove(self, mid: int) -> None:
        """Forget a message: it was acknowledged (or is given up)."""
        with self.lock:
            if mid in self._entries:
                self._forget(mid)
                self.lock.notify_all()

    def _forget(self, mid: int) -> int:
        e = self._entries.pop(mid)
        self._bytes -= e.size
        if self._db is not None:
            self._sql("DELETE FROM spool WHERE id = ?", (mid,))
        return e.size

    def requeue(self, mid: int, max_retry: int) -> bool:
        """A send failed: back to the front of the queue, or dropped after ``max_retry`` retries
        (-1: never). Return whether it was queued again."""
        with self.lock:
            e = self._entries.get(mid)
            if e is None:
                return False
            if max_retry != -1 and e.retried >= max_retry:
                self._forget(mid)
                self.dropped_failed += 1
                self.lock.notify_all()
                return False
            e.retried += 1
            self._queue.appendleft(mid)
            self.lock.notify_all()
            return True

    def requeue_all(self, mids: list[int]) -> None:
        """Put messages that were in flight back at the front, in their original order, without
        counting a retry (the connection went; the messages did nothing wrong)."""
        with self.lock:
            for mid in sorted(mids, reverse=True):
                if mid in self._entries:
                    self._queue.appendleft(mid)
            self.lock.notify_all()

    def discard(self, mid: int) -> None:
        """Give a message up (never deliverable as it is) and count it."""
        with self.lock:
            if mid in self._entries:
                self._forget(mid)
                self.dropped_failed += 1
                self.lock.notify_all()

    def stats(self) -> SpoolStats:
        with self.lock:
            return SpoolStats(messages=len(self._entries), bytes=self._bytes, queued=len(self._queue),
                              in_flight=len(self._entries) - len(self._queue),
                              dropped_qos0=self.dropped_qos0, dropped_failed=self.dropped_failed)

    def close(self) -> None:
        """Close the SQLite file (Disk); what it holds is kept for the next start."""
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _dumps(props: dict | None) -> str | None:
    """MQTT 5 properties as JSON for the Disk spool (bytes as {"hex": ...})."""
    if not props:
        return None
    return json.dumps({k: {"hex": v.hex()} if isinstance(v, (bytes, bytearray)) else v for k, v in props.items()})


def _loads(text: str | None) -> dict | None:
    if not text:
        return None
    return {k: bytes.fromhex(v["hex"]) if isinstance(v, dict) else v for k, v in json.loads(text).items()}
