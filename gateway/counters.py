"""Cumulative counters to interval energy.

An energy meter does not send "the energy of the last minute": it keeps a counter that only
goes up (total import kWh since it was made). A reading is the energy in an interval, so it is
the counter's *delta* between two polls, converted to kWh (``Register.to_kwh``). One poll per
interval boundary; the reading's ``ts`` is the boundary (the end of the interval).

:func:`step` takes a meter's last counter (``(value, ts)`` in the register's unit, or None) and a
new poll, and says what the poll means:

- **first poll** (no last counter): a baseline; no reading.
- **normal**: ``delta = new - last`` (≥ 0), one reading.
- **rollover**: the counter went backwards, but ``modulus - last + new`` (where the counter wraps:
  :attr:`Register.modulus`, the type's range or the map's ``rollover``) is at most half the
  modulus and physically possible: it wrapped, and the delta is that.
- **reset** (meter replaced, counter cleared): backwards beyond a wrap. A new series starts at the
  new value: no reading (never a huge negative or positive one), and the poll is reported as a
  quarantined record with the reason (``counter reset``).
- **gap** (missed polls: the meter did not answer, the gateway was down): the delta spans ``n``
  intervals. It is **spread evenly** over them: ``n`` readings of ``delta / n`` at each missed
  boundary. The total energy is exact; its shape within the gap is the best guess there is. A gap
  longer than ``max_spread`` intervals is not spread (days of flat made-up readings would hide the
  outage): its energy is quarantined as one record over the whole span, with the reason.
- **spike**: a delta the meter cannot physically make, more than ``max_power_kw × span``, is
  quarantined with the reason, and the series goes on from the new value.

After any of these the new poll becomes the last counter, which the source commits as its position
with the readings, so after a restart the first delta is right and nothing is counted twice.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from gateway.registermap import Register

__all__ = ["Step", "step", "EVENTS"]

_MS_PER_HOUR = 3_600_000
#: What a poll meant.
EVENTS = ("baseline", "ok", "rollover", "reset", "gap", "spike", "repeat")


class Step(NamedTuple):
    state: tuple[float, int]  # the new last counter: (value in the register's unit, ts)
    readings: list[tuple[int, float]]  # (ts, kWh) for each interval
    event: str  # one of EVENTS
    problem: str | None  # why the poll is quarantined (reset, gap too long, spike), else None
    seen: tuple  # (register, unit, value, ts, last): what was seen

    @property
    def raw(self) -> str:
        """What was seen, as JSON, for the quarantine record (made only for a poll that goes there)."""
        name, unit, value, ts, last = self.seen
        return json.dumps({"register": name, "unit": unit, "value": value, "ts": ts,
                           "last": None if last is None else {"value": last[0], "ts": last[1]}})


def step(last: tuple[float, int] | None, value: float, ts: int, register: Register, interval_ms: int,
         max_power_kw: float | None = None, max_spread: int = 60) -> Step:
    """What the poll ``value`` (in ``register.unit``) at boundary ``ts`` means after ``last``."""
    modulus = register.modulus
    if modulus is not None:
        value = value % modulus  # a signed counter past its top reads negative
    raw = (register.name, register.unit, value, ts, last)  # Step.raw turns it into JSON when needed
    if last is None:
        return Step((value, ts), [], "baseline", None, raw)
    old, old_ts = last
    if ts <= old_ts:  # the same boundary again (a restart within the interval): nothing new
        return Step(last, [], "repeat", None, raw)
    n = max(1, (ts - old_ts) // interval_ms)
    hours = (ts - old_ts) / _MS_PER_HOUR
    limit_kwh = None if max_power_kw is None else max_power_kw * hours
    delta = value - old
    event = "ok"
    if delta < 0:
        wrapped = None if modulus is None else modulus - old + value
        if (wrapped is not None and wrapped <= modulus / 2
                and (limit_kwh is None or wrapped * register.to_kwh <= limit_kwh)):
            delta, event = wrapped, "rollover"
        else:
            problem = (f"counter reset: {register.name} went from {old:g} to {value:g} {register.unit}, backwards "
                       f"beyond a wrap (meter replaced or cleared?); a new series starts at {value:g}")
            return Step((value, ts), [], "reset", problem, raw)
    kwh = delta * register.to_kwh
    if limit_kwh is not None and kwh > limit_kwh:
        problem = (f"physically impossible: {kwh:g} kWh in {hours * 60:g} min is {kwh / hours:g} kW on average, "
                   f"over the meter's max_power_kw {max_power_kw:g}")
        return Step((value, ts), [], "spike", problem, raw)
    if n > max_spread:
        problem = (f"gap of {n} intervals: {kwh:g} kWh between {old_ts} and {ts} is not spread over more than "
                   f"{max_spread} intervals (max_spread_intervals)")
        return Step((value, ts), [], "gap", problem, raw)
    if n > 1:
        event = "gap" if event == "ok" else event
    share = kwh / n
    times = [old_ts + k * interval_ms for k in range(1, n)] + [ts]
    return Step((value, ts), [(t, share) for t in times], event, None, raw)
