"""What a reading is, and the checks every reading passes before it is stored.

A reading is one meter's energy over one interval:

- ``site``: the site it belongs to (it picks the topic and the UTC offset);
- ``building``: the building id;
- ``meter``: one of :data:`METER_TYPES`;
- ``ts``: the end of the interval, UTC, epoch milliseconds;
- ``value``: energy in the interval, kWh (ASHRAE site 0 electricity is kBTU, as recorded);
- ``source``: the id of the source that produced it.

A reading that fails a check becomes a :class:`Rejected`, which the buffer writes to its
quarantine table with the reason, the raw input and where it came from. Nothing is dropped
silently and nothing stops the gateway.
"""

from __future__ import annotations

import math
import time
from operator import itemgetter
from typing import NamedTuple

#: Meter types, in ASHRAE's code order (0 electricity, 1 chilled water, 2 steam, 3 hot water).
METER_TYPES: tuple[str, ...] = ("electricity", "chilledwater", "steam", "hotwater")
METER_CODE: dict[str, int] = {name: code for code, name in enumerate(METER_TYPES)}

#: How far in the future a timestamp may be before it is rejected (clock skew allowance).
MAX_FUTURE_MS = 24 * 3600 * 1000
#: The earliest timestamp accepted (2000-01-01T00:00:00Z): anything older is a unit mistake.
MIN_TS_MS = 946_684_800_000


class Reading(NamedTuple):
    site: str
    building: str
    meter: str
    ts: int
    value: float
    source: str

    @property
    def meter_id(self) -> str:
        """The meter's key: ``<building>:<meter type>``."""
        return f"{self.building}:{self.meter}"


class Rejected(NamedTuple):
    """An input that could not become a valid reading."""

    reason: str
    raw: str
    source: str
    where: str  # e.g. "sample.csv.gz:767767" (file and line) or "simulator@1700000000000"


_KEY, _TS, _VALUE, _SOURCE = itemgetter(0, 1, 2), itemgetter(3), itemgetter(4), itemgetter(5)
_INT, _NUMBER = {int}, {int, float}
_BIG = float(1 << 1000)


def check_batch(readings: list[Reading], now_ms: int) -> tuple[list, list[int], list, str] | None:
    """The columns of a batch in which every reading passes :func:`check` and all come from one
    source: ``(meter keys (site, building, meter), ts, values, source)``, checked with C-level
    passes; None when anything fails (check each reading then, for its reason). The meter type is
    not checked here: a key the buffer does not know yet takes the reading-by-reading path."""
    ts = list(map(_TS, readings))
    if set(map(type, ts)) != _INT or min(ts) < MIN_TS_MS or max(ts) > now_ms + MAX_FUTURE_MS:
        return None
    values = list(map(_VALUE, readings))
    if not set(map(type, values)) <= _NUMBER or min(values) < 0 or max(values) >= _BIG:
        return None  # a huge integer cannot become a float
    if not math.isfinite(sum(values)):
        return None  # a NaN or an infinity makes the sum non-finite
    sources = set(map(_SOURCE, readings))
    if len(sources) != 1:
        return None
    return list(map(_KEY, readings)), ts, values, sources.pop()


def check(reading: Reading, now_ms: int | None = None) -> str | None:
    """Return why ``reading`` is invalid, or None when it is fine."""
    if type(reading.site) is not str or not reading.site:
        return f"site: {reading.site!r} is not a non-empty string"
    if type(reading.building) is not str or not reading.building:
        return f"building: {reading.building!r} is not a non-empty string"
    if reading.meter not in METER_CODE:
        return f"meter: {reading.meter!r} is not one of {', '.join(METER_TYPES)}"
    ts = reading.ts
    if type(ts) is not int:
        return f"ts: {ts!r} is not an integer of epoch milliseconds"
    if ts < MIN_TS_MS:
        return f"ts: {ts} is before 2000-01-01 (seconds instead of milliseconds?)"
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if ts > now + MAX_FUTURE_MS:
        return f"ts: {ts} is more than 24 h in the future"
    value = reading.value
    if type(value) is not float and type(value) is not int:
        return f"value: {value!r} is not a number"
    if type(value) is int and not -(1 << 1000) < value < (1 << 1000):
        return f"value: an integer of {value.bit_length()} bits is too large for a reading"
    if not math.isfinite(value):
        return f"value: {value!r} is not finite"
    if value < 0:
        return f"value: {value!r} is negative"
    return None
