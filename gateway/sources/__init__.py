"""Readings in: the Source seam.

A source turns something (a file, a simulation, a Modbus device) into batches of readings.
It is one method::

    class Source(Protocol):
        name: str
        def batches(self, position, stop) -> Iterator[Batch]: ...

``position`` is what the source last committed (None on first start). Each :class:`Batch`
carries the position *after* it; the runner stores the batch's readings and that position in
one SQLite transaction, so a restart resumes exactly after the last stored batch: nothing
skipped, nothing read twice. ``stop`` is a :class:`threading.Event`; a source that paces
itself waits on it instead of sleeping, so Ctrl-C is prompt.

When the buffer is full under ``reject_newest``, a source waits by default: its batch is
offered again once the forwarder has made room, and its position stays. A source that cannot
wait (a meter whose values are gone if not taken now) says so with ``can_wait = False``: its
batch is then refused and counted (``rejected_newest``), and its position moves on.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, NamedTuple, Protocol, runtime_checkable

from gateway.readings import Reading, Rejected


class Batch(NamedTuple):
    readings: list[Reading]
    rejected: list[Rejected]
    position: Any  # JSON-serialisable; passed back to batches() on restart


@runtime_checkable
class Source(Protocol):
    name: str

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        """Yield batches from ``position`` on, until exhausted or ``stop`` is set."""
        ...


class ListSource:
    """An in-memory source for tests: yields the given readings in batches of ``size``."""

    def __init__(self, name: str, readings: list[Reading], size: int = 100):
        self.name = name
        self.readings = readings
        self.size = size

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        start = int(position or 0)
        for i in range(start, len(self.readings), self.size):
            if stop.is_set():
                return
            chunk = self.readings[i : i + self.size]
            yield Batch(chunk, [], i + len(chunk))
