"""Replay recorded meter readings from a file, as fast as possible or in scaled time.

Two formats, chosen by the file name, both read by :mod:`gateway.ashrae`:

- ``*.csv`` / ``*.csv.gz``: the ASHRAE layout (``building_id, meter, timestamp, meter_reading,
  site_id, ...``; see ``data/README.md``). ``timestamp`` is the site's local standard time,
  ``YYYY-MM-DD HH:MM:SS``; it is converted to UTC with the site's offset
  (:data:`gateway.sites.UTC_OFFSET_HOURS`, overridable with ``site_offsets``).
- ``*.json`` / ``*.json.gz``: a JSON array of messages, one reading each, with the same field
  names (``{"building_id": 1433, "meter": 0, "site_id": 15, "timestamp": 1451624400000,
  "meter_reading": 45.2}``). A numeric ``timestamp`` is UTC epoch milliseconds; a
  ``YYYY-MM-DD HH:MM:SS`` string is site-local, as in the CSV.

Every reading it yields passes :func:`gateway.readings.check`. Anything else, a row it cannot
parse, a value the checks refuse, a 10 MB line, a message nested 100,000 deep, becomes a
:class:`~gateway.readings.Rejected` with its reason, its raw text (at most 1 KB) and
``file:line`` (``readings.csv.gz:767766``, the header being line 1; ``readings.json:1[12]`` for
the 13th message of a JSON array, which starts on line 1), and the source goes on: its
position passes the bad input, so a restart does not meet it again. Only a file cut short (a
gzip or a JSON array that ends early) stops the source, at the cut: the rows before it come
out, and the position stays before the cut, so a restart meets it again (one rejection, no
failure) and a mended file is read on from there.

Position is the number of data lines consumed (CSV, header excluded) or messages consumed
(JSON). Resuming from ``N`` skips exactly ``N`` lines without parsing them.

Pacing: ``speed=None`` reads as fast as it can (backfill). ``speed=60.0`` plays 60 data-seconds
per wall-second: batches are cut whenever the timestamp column changes and each waits, on
``stop.wait``, until its time has come. The pace follows the timestamp column as written, i.e.
site-local time for the CSV (the order the file is sorted in) and UTC for JSON.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from gateway import ashrae
from gateway.errors import ConfigError
from gateway.sites import UTC_OFFSET_HOURS
from gateway.sources import Batch

__all__ = ["ReplaySource"]


class ReplaySource:
    """A :class:`~gateway.sources.Source` that replays an ASHRAE CSV(.gz) or JSON array file."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        speed: float | None = None,
        batch_size: int = 5000,
        site_offsets: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if speed is not None and not (speed > 0):
            raise ConfigError("speed", f"{speed!r} must be > 0 (or null for as fast as possible)")
        if batch_size < 1:
            raise ConfigError("batch_size", f"{batch_size!r} must be >= 1")
        self.name = name
        self.path = Path(path)
        self.speed = speed
        self.batch_size = batch_size
        self.offsets: dict[str, float] = {**UTC_OFFSET_HOURS, **{str(k): v for k, v in (site_offsets or {}).items()}}
        self.clock = clock
        lower = self.path.name.lower()
        self._is_json = lower.endswith(".json") or lower.endswith(".json.gz")

    def __repr__(self) -> str:
        return f"ReplaySource({self.name!r}, {str(self.path)!r}, speed={self.speed!r})"

    # -- the Source seam -------------------------------------------------------------------

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        """Yield batches from ``position`` (lines or messages consumed; None = start) on."""
        start = int(position or 0)
        if start < 0:
            raise ValueError(f"position: {position!r} must be >= 0")
        read = ashrae.stream_json if self._is_json else ashrae.stream
        groups = read(self.path, self.name, start, self.offsets, self.batch_size, by_time=self.speed is not None)
        try:
            yield from self._paced(groups, stop)
        except ashrae.MissingColumns as exc:
            raise ConfigError("path", str(exc)) from exc

    # -- pacing ----------------------------------------------------------------------------

    def _paced(self, groups: Iterator[tuple[Batch, int | None]], stop: threading.Event) -> Iterator[Batch]:
        """Yield each batch once its data time (``key``, epoch ms) is due at ``speed``."""
        speed = self.speed
        wall0: float | None = None
        key0 = 0
        for batch, key in groups:
            if stop.is_set():
                return
            if speed is not None and key is not None:
                if wall0 is None:
                    wall0, key0 = self.clock(), key
                else:
                    delay = wall0 + (key - key0) / 1000.0 / speed - self.clock()
                    if delay > 0 and stop.wait(delay):
                        return
            yield batch
