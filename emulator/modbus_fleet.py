"""A simulated fleet of Modbus TCP meters: the meters of the demo and of the modbus source's tests.

:class:`FleetServer` serves N meters as unit ids (1..247) on one or several TCP ports, one
pymodbus server per port, all on one asyncio loop in a thread of their own::

    with FleetServer(meters=30, ports=2, base_port=0, maps=["eastron-sdm630"]) as fleet:
        fleet.devices          # who is where: host, port, unit_id, map, site, building, meter, max_power_kw
        fleet.requests         # read requests received so far
        fleet.injected         # every fault it injected, as Injection(ts, port, unit, kind, detail)

**What a meter shows.** Each meter's registers are laid out by a shipped register map
(:mod:`gateway.registermap`; ``maps`` cycles over the meters) and computed when a client reads
them, at the fleet's clock (a read of an unmapped address is answered with exception 2, and
one of more registers than the map's ``max_count`` with exception 3, as the meters do):

- every ``energy`` register holds a **cumulative counter**: the meter's initial reading plus the
  sum of its interval energy so far, in the register's unit and scale (an integer register holds
  the completed units, ``floor(value / scale)``; a float register the value itself). Inside an
  interval the counter grows linearly towards the end of the interval's energy, so at each
  interval boundary it equals the exact sum;
- every ``power`` register holds the instantaneous power of the interval in progress (its
  energy over its length).

The interval energy comes from :class:`~gateway.sources.simulator.SimulatorSource`'s shapes by
default (one interval a minute, the fleet starting at the last whole minute), or from a replay
of a file in the ASHRAE columns (``replay=``; one interval an hour, the file's first hour at the
fleet's start, looping at its end; an hour the file lacks repeats the meter's last known hour).

**Time** is a clock of epoch seconds: the wall clock, the wall clock sped up ``speed`` times from
the moment the fleet is made, or any callable a test gives (it must never go backwards; a read
at an earlier time than one already served sees the later state).

**Faults**, per meter (``(port index, unit)``, or at runtime by real port) or at a rate:

- ``timeout``: the request gets no answer at all (the client times out);
- ``exception``: the request gets a Modbus exception response (``exception_code``, 4 = server
  device failure by default);
- ``reset``: the counter goes back to 0 at a given fleet time, or at interval boundaries at a
  rate per meter (a meter replaced); it goes on counting from there;
- ``rollover``: the counter starts close enough below its register's wrap (the map's ``rollover``
  or the integer type's range, as :mod:`gateway.registermap` reads it: a signed counter modulo
  ``2**bits`` too, so it wraps from raw −1 to 0) to wrap after about ``rollover_after_s`` of
  consumption (three intervals by default). A float
  register with no declared rollover cannot wrap: such a meter is refused by name, and skipped
  by a rate.

Every fault is recorded in :attr:`FleetServer.injected` and appended to ``log_path`` (CSV with a
header when it ends in ``.csv``, else JSON lines): ``ts`` (fleet time, epoch ms), ``port``,
``unit``, ``kind``, ``detail``. A timeout or exception is recorded per request it hit; a reset
when it happens; a rollover when the meter is armed (its detail says the starting raw value
and the wrap).

``devices_csv`` writes the fleet's devices in the modbus source's ``devices_csv`` columns
(:data:`DEVICE_COLUMNS`), so a gateway can be pointed at it. ``gateway simulate modbus`` is the
command over this class.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import random
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from gateway.errors import ConfigError, GatewayError
from gateway.registermap import DATA_TYPES, Register, RegisterMap, encode, load_map, words

__all__ = ["FleetServer", "Device", "Injection", "DEVICE_COLUMNS", "MAX_UNITS", "KINDS"]

#: Unit ids a port can serve (Modbus: 1..247).
MAX_UNITS = 247
#: The columns of the devices CSV (the modbus source's ``devices_csv``). ``name`` is
#: ``<host>:<port>#<unit_id>``: the source's default name, ``<host>#<unit_id>``, repeats on a
#: second port of one host.
DEVICE_COLUMNS = ("name", "host", "port", "unit_id", "map", "site", "building", "meter", "max_power_kw")
#: The kinds of fault, as recorded.
KINDS = ("timeout", "exception", "reset", "rollover")

_SIM_INTERVAL_S = 60
_REPLAY_INTERVAL_S = 3600
_MS_PER_HOUR = 3_600_000
_FC_KIND = {3: "holding", 4: "input"}


class Device(NamedTuple):
    """One served meter, as a row of the devices CSV."""

    name: str
    host: str
    port: int
    unit_id: int
    map: str
    site: str
    building: str
    meter: str
    max_power_kw: float


class Injection(NamedTuple):
    """One injected fault."""

    ts: int  # fleet time, epoch ms
    port: int
    unit: int
    kind: str  # one of KINDS
    detail: str


# -- consumption: interval energy per meter -------------------------------------------------------


@dataclass
class _Consumption:
    """Interval energy of the fleet: ``energy(k)`` is each meter's kWh in interval k (k ≥ 1),
    the interval ending at ``start_ms + k × interval_ms``."""

    interval_ms: int
    sites: list[str]
    buildings: list[str]
    meter_types: list[str]
    max_power_kw: np.ndarray
    energy: Callable[[int], np.ndarray]


def _simulated(n: int, seed: int, start_ms: int, metadata_path: Any) -> _Consumption:
    from gateway.sources.simulator import DEFAULT_METADATA, SimulatorSource

    sim = SimulatorSource("modbus-fleet", meters=n, seed=seed, start_ms=start_ms, interval_s=_SIM_INTERVAL_S,
                          speed=None, metadata_path=DEFAULT_METADATA if metadata_path is None else metadata_path)
    interval_ms = sim.interval_ms
    # The declared maximum: twice the highest power over two days of hours (noise is ±5 %).
    day = np.max([sim.values_at(start_ms + h * _MS_PER_HOUR + interval_ms)[0] for h in range(48)], axis=0)
    peak_kw = day / (interval_ms / _MS_PER_HOUR)
    return _Consumption(interval_ms, list(sim.sites), list(sim.buildings), list(sim.meter_types),
                        _nice_max(2.0 * peak_kw), lambda k: sim.values_at(start_ms + k * interval_ms)[0])


def _replayed(path: str | Path, n: int | None) -> _Consumption:
    """The meters of an ASHRAE-columns file as hourly series (gaps hold the last known hour)."""
    from gateway import ashrae
    from gateway.readings import METER_TYPES

    table = ashrae.read(path)
    if not len(table):
        raise ConfigError("replay", f"{path}: no readings to replay")
    hours = (table.ts_ms - table.ts_ms.min()) // _MS_PER_HOUR
    h = int(hours.max()) + 1
    keys, meter_of = np.unique(np.stack([table.building_id, table.meter]), axis=1, return_inverse=True)
    m = keys.shape[1]
    series = np.full((h, m), np.nan)
    series[hours, meter_of.ravel()] = table.meter_reading
    for j in range(m):  # hold the last known hour (the first known one before it)
        col = series[:, j]
        known = np.flatnonzero(~np.isnan(col))
        col[:] = col[known[np.maximum(np.searchsorted(known, np.arange(h), side="right") - 1, 0)]]
    site_of = {int(b): str(s) for b, s in zip(table.building_id.tolist(), table.site_id.tolist())}
    n = m if n is None else n
    pick = np.arange(n) % m
    copy = np.arange(n) // m
    buildings = [str(keys[0, j]) + (f"-r{c}" if c else "") for j, c in zip(pick.tolist(), copy.tolist())]
    sites = [site_of[int(keys[0, j])] for j in pick.tolist()]
    types = [METER_TYPES[int(keys[1, j])] for j in pick.tolist()]
    data = series[:, pick]
    peak_kw = data.max(axis=0)  # kWh in an hour = kW
    return _Consumption(_REPLAY_INTERVAL_S * 1000, sites, buildings, types, _nice_max(2.0 * peak_kw),
                        lambda k: data[(k - 1) % h])


def _nice_max(kw: np.ndarray) -> np.ndarray:
    """``kw`` rounded up to two significant digits (at least 0.1 kW)."""
    kw = np.maximum(np.asarray(kw, dtype=float), 0.1)
    step = 10.0 ** (np.floor(np.log10(kw)) - 1)
    return np.ceil(kw / step) * step


# -- counters: the cumulative energy the meters show -----------------------------------------------


class _Counters:
    """Cumulative energy per meter, advanced interval by interval as the clock moves.

    ``total`` is the energy consumed up to the boundary ``k`` (``start_ms + k × interval``);
    ``current`` the energy of interval ``k + 1``, in progress. A meter shows ``offset + consumed``
    (``offset`` is its initial reading, and after a reset minus what it had consumed then)."""

    def __init__(self, consumption: _Consumption, start_ms: int, offsets: np.ndarray,
                 reset_rate: float, seed: int, on_reset: Callable[[int, int], None]):
        self.c = consumption
        self.start_ms = start_ms
        self.interval = consumption.interval_ms
        self.offset = offsets.astype(float)
        self.k = 0
        self.total = np.zeros(len(offsets))
        self.current = np.asarray(consumption.energy(1), dtype=float)
        self.latest_ms = start_ms
        self.reset_rate = reset_rate
        self.seed = seed
        self.on_reset = on_reset
        self.scheduled: list[tuple[int, int]] = []  # (ts_ms, meter), sorted
        self.lock = threading.RLock()

    def _consumed(self, i: int | slice, t_ms: int):
        frac = (t_ms - (self.start_ms + self.k * self.interval)) / self.interval
        return self.total[i] + frac * self.current[i]

    def advance(self, t_ms: int) -> int:
        """Bring the state to ``t_ms`` (never backwards); the time the state is at."""
        with self.lock:
            t_ms = max(int(t_ms), self.latest_ms)
            while t_ms >= self.start_ms + (self.k + 1) * self.interval:
                boundary = self.start_ms + (self.k + 1) * self.interval
                self._due(boundary)
                self.total = self.total + self.current
                self.k += 1
                self.current = np.asarray(self.c.energy(self.k + 1), dtype=float)
                if self.reset_rate > 0:
                    hit = np.random.default_rng([self.seed, 0x5E7, self.k]).random(len(self.total)) < self.reset_rate
                    for i in np.flatnonzero(hit).tolist():
                        self.reset(i, boundary)
            self._due(t_ms)
            self.latest_ms = t_ms
            return t_ms

    def _due(self, t_ms: int) -> None:
        while self.scheduled and self.scheduled[0][0] <= t_ms:
            ts, i = self.scheduled.pop(0)
            self.reset(i, ts)

    def reset(self, i: int, t_ms: int) -> None:
        """Meter ``i``'s counter shows 0 at ``t_ms`` (within the current interval)."""
        with self.lock:
            self.offset[i] = -self._consumed(i, t_ms)
            self.on_reset(i, t_ms)

    def schedule(self, i: int, t_ms: int) -> None:
        with self.lock:
            self.scheduled.append((int(t_ms), i))
            self.scheduled.sort()

    def consumed(self, i: int, t_ms: int) -> float:
        """Energy meter ``i`` consumed since the fleet started, kWh, at ``t_ms``."""
        with self.lock:
            return float(self._consumed(i, max(int(t_ms), self.latest_ms)))

    def shown(self, i: int, t_ms: int) -> float:
        """What meter ``i``'s counter shows, kWh (before any wrap), at ``t_ms``."""
        with self.lock:
            return float(self.offset[i] + self._consumed(i, max(int(t_ms), self.latest_ms)))

    def power_kw(self, i: int) -> float:
        with self.lock:
            return float(self.current[i]) / (self.interval / _MS_PER_HOUR)


# -- register values ------------------------------------------------------------------------------


def _modulus_raw(register: Register) -> int | None:
    """Where an energy register's raw value wraps (None: a float that never does)."""
    m = register.modulus
    if m is None:
        return None
    return max(1, round(m / register.scale))


def _words(register: Register, kwh_or_kw: float, start_raw: int = 0) -> list[int]:
    """The words ``register`` holds for ``kwh_or_kw`` (kWh for energy, kW for power).

    An integer energy counter holds the completed units from ``start_raw`` on, modulo its wrap."""
    value = kwh_or_kw / register.to_kwh
    code, n, integer = DATA_TYPES[register.data_type]
    if register.meaning != "energy" or not integer:
        return encode(register, value)
    raw = start_raw + math.floor(value / register.scale + 1e-9)
    modulus = _modulus_raw(register)
    raw %= modulus
    if raw < 2**53:
        return encode(register, raw * register.scale)
    # Past float precision (a 64-bit counter armed near its wrap): pack the integer directly.
    bits = 16 * n
    if code.islower() and raw >= 1 << (bits - 1):
        raw -= 1 << bits
    data = struct.pack(">" + code, raw)
    out = [int.from_bytes(data[j : j + 2], "big") for j in range(0, len(data), 2)]
    if register.byte_order == "little":
        out = [((w & 0xFF) << 8) | (w >> 8) for w in out]
    return out if register.word_order == "big" else out[::-1]


def _shown_value(register: Register, kwh: float, start_raw: int = 0) -> float:
    """What a client decodes from an energy register holding ``kwh`` (its unit, after the wrap)."""
    value = kwh / register.to_kwh
    if not DATA_TYPES[register.data_type][2]:
        return float(np.float32(value / register.scale)) * register.scale if register.data_type == "f32" else value
    raw = (start_raw + math.floor(value / register.scale + 1e-9)) % _modulus_raw(register)
    return raw * register.scale


# -- the server -----------------------------------------------------------------------------------


class _Meter:
    """A served meter's state: where it is, its map, its faults."""

    __slots__ = ("index", "port_index", "unit", "map", "by_kind", "start_raw", "timeout", "exception",
                 "rollover_detail")

    def __init__(self, index: int, port_index: int, unit: int, regmap: RegisterMap):
        self.index = index
        self.port_index = port_index
        self.unit = unit
        self.map = regmap
        self.by_kind = {k: [r for r in regmap.registers if r.kind == k] for k in ("holding", "input")}
        self.start_raw: dict[str, int] = {}  # energy register name → raw start (rollover armed)
        self.timeout = False
        self.exception: int | None = None
        self.rollover_detail = ""


class FleetServer:
    """Serve a simulated fleet of Modbus TCP meters; see the module docstring.

    ``ports`` is the number of TCP ports (``base_port``, ``base_port + 1``, ...; a base port of 0
    lets the system choose each one). Meters are spread evenly over the ports, unit ids from 1.
    Per-meter faults are keyed ``(port index, unit id)``: ``timeouts`` and ``rollovers`` are sets
    of them, ``exceptions`` maps them to a code (None: ``exception_code``), ``resets`` to the fleet
    seconds after the start at which the counter goes to 0."""

    def __init__(
        self,
        meters: int | None = 100,
        ports: int = 1,
        base_port: int = 5020,
        host: str = "127.0.0.1",
        maps: Sequence[str] = ("eastron-sdm630",),
        replay: str | Path | None = None,
        seed: int = 0,
        speed: float | None = None,
        clock: Callable[[], float] | None = None,
        timeouts: Iterable[tuple[int, int]] = (),
        exceptions: Mapping[tuple[int, int], int | None] | None = None,
        resets: Mapping[tuple[int, int], float] | None = None,
        rollovers: Iterable[tuple[int, int]] = (),
        timeout_rate: float = 0.0,
        exception_rate: float = 0.0,
        exception_code: int = 4,
        reset_rate: float = 0.0,
        rollover_rate: float = 0.0,
        rollover_after_s: float | None = None,
        log_path: str | Path | None = None,
        devices_csv: str | Path | None = None,
        metadata_path: str | Path | None = None,
    ):
        from pymodbus.constants import ExcCodes

        if meters is not None and meters < 1:
            raise ConfigError("meters", f"{meters!r} must be >= 1")
        if ports < 1:
            raise ConfigError("ports", f"{ports!r} must be >= 1")
        if meters is not None and meters > ports * MAX_UNITS:
            raise ConfigError("ports", f"{ports} port{'s' if ports > 1 else ''} serve at most {ports * MAX_UNITS} "
                                       f"meters ({MAX_UNITS} unit ids a port); {meters} need at least "
                                       f"{math.ceil(meters / MAX_UNITS)}")
        if base_port and not 1 <= base_port <= 65536 - ports:
            raise ConfigError("base_port", f"{base_port} is out of range 1..{65536 - ports} for {ports} ports")
        if speed is not None and not speed > 0:
            raise ConfigError("speed", f"{speed!r} must be > 0")
        if speed is not None and clock is not None:
            raise ConfigError("speed", "give speed or clock, not both")
        for name, rate in (("timeout_rate", timeout_rate), ("exception_rate", exception_rate),
                           ("reset_rate", reset_rate), ("rollover_rate", rollover_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(name, f"{rate!r} must be within 0..1")
        codes = {int(c) for c in ExcCodes}
        for where, code in [("exception_code", exception_code)] + [
                (f"exceptions[{k}]", c) for k, c in (exceptions or {}).items() if c is not None]:
            if code not in codes:
                raise ConfigError(where, f"{code!r} is not a Modbus exception code ({', '.join(map(str, sorted(codes)))})")
        if not maps:
            raise ConfigError("maps", "give at least one register map")
        self.host = host
        self.seed = int(seed)
        self.log_path = Path(log_path) if log_path is not None else None
        self.timeout_rate = float(timeout_rate)
        self.exception_rate = float(exception_rate)
        self.exception_code = int(exception_code)
        self._ExcCodes = ExcCodes
        self._maps = [load_map(m) for m in maps]
        self._map_names = {id(regmap): str(given) for regmap, given in zip(self._maps, maps)}  # as given: loadable
        if clock is None:
            if speed is None or speed == 1:
                clock = time.time
            else:
                t0 = time.time()
                clock = lambda: t0 + (time.time() - t0) * speed  # noqa: E731
        self.clock = clock

        if replay is not None:
            cons = _replayed(replay, meters)
        else:
            start = int(clock() * 1000) // (_SIM_INTERVAL_S * 1000) * (_SIM_INTERVAL_S * 1000)
            cons = _simulated(meters or 100, self.seed, start, metadata_path)
        n = len(cons.sites)
        if n > ports * MAX_UNITS:
            raise ConfigError("ports", f"{n} meters need at least {math.ceil(n / MAX_UNITS)} ports")
        self.start_ms = int(clock() * 1000) // cons.interval_ms * cons.interval_ms
        self.n_ports = ports
        self.base_port = base_port
        per_port = math.ceil(n / ports)
        self._meters = [_Meter(i, i // per_port, i % per_port + 1, self._maps[i % len(self._maps)]) for i in range(n)]
        self._by_key = {(m.port_index, m.unit): m for m in self._meters}
        self._consumption = cons
        #: Every fault injected so far, in order.
        self.injected: list[Injection] = []
        #: Read requests received (answered or not), in all and per (port, unit).
        self.requests = 0
        self.requests_by: Counter[tuple[int, int]] = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self.ports: list[int] = [base_port + p if base_port else 0 for p in range(ports)]

        rng = np.random.default_rng([self.seed, 0x0FF5E7])
        offsets = rng.uniform(100.0, 10_000.0, n).round(1)  # the meters' readings when the fleet starts
        self._initial = offsets
        self._counters = _Counters(cons, self.start_ms, offsets, float(reset_rate), self.seed, self._on_reset)
        for key in timeouts:
            self._meter(key, "timeouts").timeout = True
        for key, code in (exceptions or {}).items():
            self._meter(key, "exceptions").exception = self.exception_code if code is None else int(code)
        for key, after_s in (resets or {}).items():
            self._counters.schedule(self._meter(key, "resets").index, self.start_ms + round(after_s * 1000))
        self._rollover_after_ms = round((rollover_after_s if rollover_after_s is not None
                                         else 3 * cons.interval_ms / 1000) * 1000)
        armed = [self._meter(key, "rollovers") for key in rollovers]
        for m in armed:
            if not self._rollable(m):
                raise ConfigError(f"rollovers[{m.port_index}:{m.unit}]",
                                  f"map {m.map.name}'s energy registers are floats with no declared rollover: "
                                  "they cannot wrap")
        if rollover_rate > 0:
            pick = np.random.default_rng([self.seed, 0x2011]).random(n) < rollover_rate
            armed += [m for m in self._meters if pick[m.index] and self._rollable(m) and m not in armed]
        for m in armed:
            self._arm_rollover(m)
        self._armed = armed  # recorded at start, once their ports are known
        self._devices_csv = Path(devices_csv) if devices_csv is not None else None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[Any] = []

    def __repr__(self) -> str:
        return f"FleetServer(meters={len(self._meters)}, ports={self.ports}, maps={[m.name for m in self._maps]})"

    # -- the fleet ------------------------------------------------------------------------

    def _meter(self, key: tuple[int, int], where: str) -> _Meter:
        try:
            return self._by_key[(int(key[0]), int(key[1]))]
        except (KeyError, TypeError, ValueError, IndexError):
            raise ConfigError(f"{where}[{key!r}]", "is not a served (port index, unit id) "
                                                   f"(ports 0..{self.n_ports - 1}, units from 1)") from None

    def meter_at(self, port: int, unit: int) -> _Meter:
        """The meter served at (real) ``port`` and ``unit``."""
        try:
            return self._by_key[(self.ports.index(port), unit)]
        except (ValueError, KeyError):
            raise KeyError(f"no meter at port {port} unit {unit}") from None

    @property
    def devices(self) -> list[Device]:
        """The served meters as devices-CSV rows (ports are real once started)."""
        c = self._consumption
        return [Device(f"{self.host}:{self.ports[m.port_index]}#{m.unit}", self.host, self.ports[m.port_index], m.unit,
                       self._map_names[id(m.map)], c.sites[m.index],
                       c.buildings[m.index], c.meter_types[m.index], float(c.max_power_kw[m.index]))
                for m in self._meters]

    def write_devices_csv(self, path: str | Path) -> Path:
        """Write :attr:`devices` to ``path`` in :data:`DEVICE_COLUMNS`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(DEVICE_COLUMNS)
            w.writerows(self.devices)
        return path

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def initial_kwh(self, port: int, unit: int) -> float:
        """The meter's reading when the fleet started, kWh (before any armed rollover's start)."""
        return float(self._initial[self.meter_at(port, unit).index])

    def consumed_kwh(self, port: int, unit: int, t: float | None = None) -> float:
        """The energy the meter at ``port``/``unit`` consumed since the fleet's start, kWh."""
        m = self.meter_at(port, unit)
        t_ms = self._counters.advance(self.now_ms() if t is None else int(t * 1000))
        return self._counters.consumed(m.index, t_ms)

    def expected(self, port: int, unit: int, t: float | None = None) -> dict[str, float]:
        """What a client decodes from each of the meter's registers at fleet time ``t`` (now)."""
        m = self.meter_at(port, unit)
        t_ms = self._counters.advance(self.now_ms() if t is None else int(t * 1000))
        out = {}
        for r in m.map.registers:
            if r.meaning == "energy":
                out[r.name] = _shown_value(r, self._counters.shown(m.index, t_ms), m.start_raw.get(r.name, 0))
            else:
                out[r.name] = self._counters.power_kw(m.index) / r.to_kwh
        return out

    # -- faults ---------------------------------------------------------------------------

    def set_timeout(self, port: int, unit: int, on: bool = True) -> None:
        """From now on the meter answers nothing (``on``) or answers again."""
        self.meter_at(port, unit).timeout = on

    def set_exception(self, port: int, unit: int, code: int | None = 4) -> None:
        """From now on the meter answers exception ``code`` (None: answers normally)."""
        if code is not None and code not in {int(c) for c in self._ExcCodes}:
            raise ValueError(f"{code!r} is not a Modbus exception code")
        self.meter_at(port, unit).exception = code

    def reset(self, port: int, unit: int) -> None:
        """The meter's counter goes to 0 now (a meter replaced)."""
        m = self.meter_at(port, unit)
        t_ms = self._counters.advance(self.now_ms())
        self._counters.reset(m.index, t_ms)

    def _on_reset(self, i: int, t_ms: int) -> None:
        m = self._meters[i]
        m.start_raw.clear()  # a new counter starts at 0
        self._record(Injection(t_ms, self.ports[m.port_index], m.unit, "reset", "counter set to 0"))

    @staticmethod
    def _rollable(m: _Meter) -> bool:
        return any(_modulus_raw(r) is not None for r in m.map.of_meaning("energy"))

    def _arm_rollover(self, m: _Meter) -> None:
        """Start the meter's integer counters about ``rollover_after_s`` of consumption below their wrap."""
        c = self._consumption
        kwh_per_ms = float(self._counters.current[m.index]) / c.interval_ms
        ahead_kwh = max(kwh_per_ms * self._rollover_after_ms, 1e-6)
        shown = float(self._counters.offset[m.index])
        details = []
        for r in m.map.of_meaning("energy"):
            modulus = _modulus_raw(r)
            if modulus is None:
                continue
            ahead = max(1, math.ceil(ahead_kwh / r.to_kwh / r.scale))
            now = math.floor(shown / r.to_kwh / r.scale + 1e-9)
            m.start_raw[r.name] = (modulus - ahead - now) % modulus
            details.append(f"{r.name} starts at raw {(m.start_raw[r.name] + now) % modulus}, wraps at {modulus}")
        m.rollover_detail = "; ".join(details)

    def _record(self, inj: Injection) -> None:
        with self._lock:
            self.injected.append(inj)
            self._write_log([inj])

    def _write_log(self, items: list[Injection]) -> None:
        if self.log_path is None or not items:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        is_csv = self.log_path.suffix.lower() == ".csv"
        new = not self.log_path.exists() or self.log_path.stat().st_size == 0
        with open(self.log_path, "a", encoding="utf-8", newline="") as f:
            if is_csv:
                w = csv.writer(f)
                if new:
                    w.writerow(Injection._fields)
                w.writerows(items)
            else:
                f.writelines(json.dumps(i._asdict()) + "\n" for i in items)

    # -- serving --------------------------------------------------------------------------

    def _count(self, port_index: int, sending: bool, pdu):
        if not sending:
            with self._lock:
                self.requests += 1
                self.requests_by[(self.ports[port_index], pdu.dev_id)] += 1
        return pdu

    async def _action(self, m: _Meter, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values):
        from pymodbus.exceptions import NoSuchIdException

        port = self.ports[m.port_index]
        if m.timeout or (self.timeout_rate and self._rng.random() < self.timeout_rate):
            self._record(Injection(self.now_ms(), port, m.unit, "timeout", f"no answer to function {function_code} "
                                                                          f"at {address} × {count}"))
            raise NoSuchIdException("injected timeout")  # with ignore_missing_devices: no answer at all
        code = m.exception
        if code is None and self.exception_rate and self._rng.random() < self.exception_rate:
            code = self.exception_code
        if code is not None:
            self._record(Injection(self.now_ms(), port, m.unit, "exception", f"code {code} to function "
                                                                            f"{function_code} at {address} × {count}"))
            return self._ExcCodes(code)
        if set_values is not None:
            return self._ExcCodes.ILLEGAL_FUNCTION  # a meter's registers are read-only
        kind = _FC_KIND.get(function_code)
        if kind is None:
            return self._ExcCodes.ILLEGAL_FUNCTION
        if count > m.map.max_count:  # as the meter does (the EM24 answers at most 11 registers)
            return self._ExcCodes.ILLEGAL_VALUE
        t_ms = self._counters.advance(self.now_ms())
        counters = self._counters
        end = address + count
        for r in m.by_kind[kind]:
            n = words(r)
            if r.address + n <= address or r.address >= end:
                continue
            if r.meaning == "energy":
                w = _words(r, counters.shown(m.index, t_ms), m.start_raw.get(r.name, 0))
            else:
                w = _words(r, counters.power_kw(m.index))
            i = r.address - start_address
            registers[i : i + n] = w
        return None

    def _simdevice(self, m: _Meter):
        from pymodbus.simulator import DataType, SimData, SimDevice

        def block(kind: str) -> list:
            regs = m.by_kind[kind]
            if not regs:
                return [SimData(0, datatype=DataType.INVALID)]
            seen: set[int] = set()
            out = []
            for r in sorted(regs, key=lambda r: r.address):
                for a in range(r.address, r.address + words(r)):
                    if a not in seen:  # overlapping registers share words
                        seen.add(a)
                        out.append(SimData(a, datatype=DataType.REGISTERS))
            return out

        bits = [SimData(0, datatype=DataType.BITS)]
        return SimDevice(m.unit, simdata=(bits, list(bits), block("holding"), block("input")),
                         action=partial(self._action, m))

    async def _serve(self) -> None:
        from pymodbus.server import ModbusTcpServer

        for p in range(self.n_ports):
            devices = [self._simdevice(m) for m in self._meters if m.port_index == p]
            server = ModbusTcpServer(devices, address=(self.host, self.ports[p]), ignore_missing_devices=True,
                                     trace_pdu=partial(self._count, p))
            self._servers.append(server)
            try:
                await server.serve_forever(background=True)
            except RuntimeError as exc:
                raise GatewayError(f"modbus fleet: cannot listen on {self.host}:{self.ports[p]} "
                                   f"(port {p + 1} of {self.n_ports}): is it in use?") from exc
            if not self.ports[p]:
                self.ports[p] = server.transport.sockets[0].getsockname()[1]

    def start(self) -> FleetServer:
        """Listen on every port (returns once they all accept connections); write the devices CSV."""
        if self._thread is not None:
            raise RuntimeError("FleetServer already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                ready.set()
                loop.run_until_complete(self._close_servers())
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close_servers())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="modbus-fleet", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        for m in self._armed:
            self._record(Injection(self.start_ms, self.ports[m.port_index], m.unit, "rollover", m.rollover_detail))
        if self._devices_csv is not None:
            self.write_devices_csv(self._devices_csv)
        return self

    async def _close_servers(self) -> None:
        for server in self._servers:
            await server.shutdown()
        self._servers = []

    def stop(self) -> None:
        """Stop serving and close every port."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_targets(values: Iterable[str], where: str) -> list[tuple[int, int, str | None]]:
    """``PORT_INDEX:UNIT[=ARG]`` texts (the command's fault options) as tuples."""
    out = []
    for text in values:
        head, _, arg = text.partition("=")
        p, sep, u = head.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(p), int(u), arg or None))
        except ValueError:
            raise ConfigError(where, f"{text!r} must be PORT_INDEX:UNIT (e.g. 0:17)") from None
    return out
