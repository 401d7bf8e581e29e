"""Real meters: a source that polls Modbus devices and turns their energy counters into readings.

Each device is one meter: a unit id (1..247) on a *bus*, read with a register map
(:mod:`gateway.registermap`). A bus is one connection:

- ``tcp``: Modbus TCP to ``host:port`` (a meter with Ethernet, or a TCP gateway in front of RS-485);
- ``rtu-over-tcp``: RTU frames through a transparent serial server at ``host:port``;
- ``rtu``: RTU on a serial line (``serial: /dev/ttyUSB0``, ``baudrate``, ``parity``, ...).

**Polling** is aligned to the interval boundary by the gateway's wall clock: every ``interval_s``
(a minute: at :00), each device is read once, after its own jitter (a fixed share of
``jitter_s`` drawn from its name, so meters on one site do not all answer at the same instant).
The poll's counter belongs to the boundary: a reading's ``ts`` is the end of its interval.

**Coalescing:** a device's registers are read with :meth:`RegisterMap.plan`: contiguous registers
in one request, at most 125 (or the map's ``max_count``) a request.

**Concurrency:** one client and one lock per bus: a serial line carries strictly one request at a
time (it is one RS-485 bus), and so does one TCP connection; different buses (TCP ports, serial
lines) are polled in parallel on one asyncio loop.

**A meter that stops answering** (timeout after its retries, an exception response, a refused
connection) is logged once at ERROR, then at DEBUG until it answers again (one INFO then). It
backs off: after ``k`` failed polls in a row it is skipped for ``min(2**(k-1), backoff_max_intervals)``
boundaries. The other meters are not affected. Its state is in :meth:`ModbusSource.status` and,
when the source runs in a :class:`~gateway.runner.Gateway`, in stage health as ``meter
<source>/<device>`` (``retrying`` with the error while down, ``running`` again once it answers),
so ``gateway status`` shows it.

**Counters** become interval energy in :mod:`gateway.counters` (rollover, reset, gaps spread
evenly, physical-limit spikes quarantined). The last counter of every meter is the source's
position, committed with the readings: ``{"meters": {device: [counter, ts]}}``.

The source cannot wait (``can_wait = False``): a meter's value is gone if not taken now. When the
buffer refuses a batch its position still moves on, and the next delta covers the interval (the
energy is not lost; it lands in the next reading's spread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gateway import counters
from gateway.readings import Reading, Rejected
from gateway.registermap import Register, RegisterMap, decode, extract, load_map
from gateway.sources import Batch

__all__ = ["ModbusSource", "Device", "TRANSPORTS"]

log = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "rtu-over-tcp", "rtu")


@dataclass
class Device:
    """One meter and what the source knows of it."""

    name: str
    unit_id: int
    site: str
    building: str
    meter: str  # a reading's meter type (electricity, ...)
    map: RegisterMap
    transport: str = "tcp"
    host: str | None = None
    port: int = 502
    serial: str | None = None
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout_s: float = 1.0
    retries: int = 1
    max_power_kw: float | None = None
    energy: str | None = None  # the map's energy register to read; None = its first
    registers: list[str] | None = None  # the map's registers to read; None = all
    # -- state --
    failures: int = 0
    next_try_ts: int = 0
    error: str | None = None
    down_since: int | None = None
    events: dict[str, int] = field(default_factory=dict)
    last_values: dict[str, float] = field(default_factory=dict)
    last_ok_ts: int | None = None

    @property
    def bus(self) -> tuple:
        if self.transport == "rtu":
            return ("rtu", self.serial)
        return (self.transport, self.host, self.port)

    @property
    def where(self) -> str:
        place = self.serial if self.transport == "rtu" else f"{self.host}:{self.port}"
        return f"unit {self.unit_id} on {place} ({self.transport})"

    @property
    def energy_register(self) -> Register:
        return self.map.register(self.energy) if self.energy else self.map.of_meaning("energy")[0]

    @property
    def to_read(self) -> list[Register]:
        regs = self.map.registers if self.registers is None else [self.map.register(n) for n in self.registers]
        e = self.energy_register
        return regs if e in regs else [*regs, e]

    @classmethod
    def from_spec(cls, spec: dict) -> "Device":
        """A device from a validated config entry (``sources[i].devices[j]``)."""
        keys = {k: v for k, v in spec.items() if k in cls.__dataclass_fields__ and k != "map"}
        m = spec["map"]
        return cls(map=m if isinstance(m, RegisterMap) else load_map(m), **keys)


class ModbusSource:
    """A :class:`~gateway.sources.Source` polling Modbus meters; see the module docstring."""

    can_wait = False

    def __init__(
        self,
        name: str,
        devices: list[Device | dict],
        interval_s: float = 60,
        jitter_s: float = 0.0,
        max_spread_intervals: int = 60,
        backoff_max_intervals: int = 16,
        wall: Callable[[], float] = time.time,
        wait: Callable[[threading.Event, float], bool] | None = None,
        health: Any = None,
    ):
        self.name = name
        self.devices = [d if isinstance(d, Device) else Device.from_spec(d) for d in devices]
        self.interval_ms = round(interval_s * 1000)
        self.jitter_s = float(jitter_s)
        self.max_spread = max_spread_intervals
        self.backoff_max = backoff_max_intervals
        self.wall = wall
        self.wait = wait or (lambda stop, seconds: stop.wait(seconds))
        #: a runner.Health (the Gateway sets it); meters that go down or recover show there
        self.health = health
        self._counters: dict[str, tuple[float, int]] = {}
        self._clients: dict[tuple, Any] = {}
        self._locks: dict[tuple, asyncio.Lock] = {}
        #: per device (by name): its registers, their coalesced requests, its energy register and
        #: its jitter, fixed once the device is made, so not worked out again at every poll
        self._plans: dict[str, tuple[list[Register], list[tuple[str, int, int]], Register]] = {}
        self._jitters: dict[str, float] = {}
        self.cycles = 0

    def __repr__(self) -> str:
        return f"ModbusSource({self.name!r}, devices={len(self.devices)}, interval_ms={self.interval_ms})"

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, dict]:
        """Each meter's state: ``ok`` or ``down`` (with its error and since when), the failed
        polls in a row, and how many polls were rollovers, resets, spikes and gaps."""
        out = {}
        for d in self.devices:
            out[d.name] = {
                "state": "down" if d.failures else "ok", "where": d.where, "error": d.error,
                "since": d.down_since, "failures": d.failures, "last_ok_ts": d.last_ok_ts,
                "events": dict(d.events), "values": dict(d.last_values),
            }
        return out

    def _stage(self, d: Device) -> str:
        return f"meter {self.name}/{d.name}"

    # -- the Source seam -------------------------------------------------------------------

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        """Poll at every boundary from now on; ``position`` holds each meter's last counter."""
        self._counters = {}
        if isinstance(position, dict):
            for key, value in (position.get("meters") or {}).items():
                if isinstance(value, (list, tuple)) and len(value) == 2:
                    self._counters[str(key)] = (float(value[0]), int(value[1]))
        loop = asyncio.new_event_loop()
        try:
            while not stop.is_set():
                now = self.wall()
                boundary = (int(now * 1000) // self.interval_ms + 1) * self.interval_ms
                if self.wait(stop, max(0.0, boundary / 1000 - now)):
                    return
                started = time.monotonic()
                batch = loop.run_until_complete(self._cycle(boundary))
                self.cycles += 1
                took = time.monotonic() - started
                if took * 1000 > self.interval_ms:
                    log.warning("source %s: a poll cycle took %.1f s, longer than the %g s interval; "
                                "the missed boundaries become gaps", self.name, took, self.interval_ms / 1000)
                yield batch
        finally:
            for client in self._clients.values():
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing what may already be broken
                    pass
            self._clients.clear()
            self._locks.clear()
            loop.close()

    # -- one cycle -------------------------------------------------------------------------

    async def _cycle(self, ts: int) -> Batch:
        buses: dict[tuple, list[Device]] = {}
        for d in self.devices:
            buses.setdefault(d.bus, []).append(d)
        results = await asyncio.gather(*(self._poll_bus(bus, devs, ts) for bus, devs in buses.items()))
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        for r, q in results:
            readings.extend(r)
            rejected.extend(q)
        readings.sort(key=lambda x: (x.ts, x.building, x.meter))
        position = {"meters": {k: [v, t] for k, (v, t) in self._counters.items()}}
        return Batch(readings, rejected, position)

    def _jitter(self, d: Device) -> float:
        j = self._jitters.get(d.name)
        if j is None:
            j = self._jitters[d.name] = self.jitter_s * (zlib.crc32(d.name.encode()) % 1000) / 1000
        return j

    def _plan(self, d: Device) -> tuple[list[Register], list[tuple[str, int, int]], Register]:
        p = self._plans.get(d.name)
        if p is None:
            regs = d.to_read
            p = self._plans[d.name] = (regs, d.map.plan(regs), d.energy_register)
        return p

    async def _poll_bus(self, bus: tuple, devices: list[Device], ts: int) -> tuple[list, list]:
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        lock = self._locks.setdefault(bus, asyncio.Lock())
        loop = asyncio.get_running_loop()
        start = loop.time()
        for d in sorted(devices, key=self._jitter):
            if ts < d.next_try_ts:
                continue  # backing off
            if self.jitter_s:
                delay = start + self._jitter(d) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with lock:  # one request at a time on a bus
                try:
                    values = await self._read(bus, d)
                except Exception as exc:  # noqa: BLE001 - any failure of one meter is that meter's
                    self._failed(d, ts, _describe(exc))
                    continue
            self._answered(d, ts, values)
            r, q = self._count(d, ts, values[self._plan(d)[2].name])
            readings.extend(r)
            rejected.extend(q)
        return readings, rejected

    async def _client(self, bus: tuple, d: Device) -> Any:
        client = self._clients.get(bus)
        if client is None:
            from pymodbus import FramerType
            from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

            if d.transport == "rtu":
                client = AsyncModbusSerialClient(d.serial, framer=FramerType.RTU, baudrate=d.baudrate, parity=d.parity,
                                                 stopbits=d.stopbits, bytesize=d.bytesize, timeout=d.timeout_s,
                                                 retries=0, reconnect_delay=0)
            else:
                framer = FramerType.RTU if d.transport == "rtu-over-tcp" else FramerType.SOCKET
                client = AsyncModbusTcpClient(d.host, port=d.port, framer=framer, timeout=d.timeout_s, retries=0,
                                              reconnect_delay=0)
            self._clients[bus] = client
        if not client.connected:
            if not await client.connect():
                raise ConnectionError(f"cannot connect to {d.where.split(' on ', 1)[1]}")
        return client

    async def _read(self, bus: tuple, d: Device) -> dict[str, float]:
        """Read ``d``'s registers (coalesced) with its retries; its decoded values by name."""
        regs, requests, _energy = self._plan(d)
        answers: dict[tuple[str, int, int], list[int]] = {}
        for kind, start, count in requests:
            last: Exception | None = None
            for _attempt in range(d.retries + 1):
                client = await self._client(bus, d)
                read = client.read_holding_registers if kind == "holding" else client.read_input_registers
                try:
                    rr = await read(start, count=count, device_id=d.unit_id)
                except Exception as exc:  # noqa: BLE001 - a timeout or a dropped connection: retry
                    last = exc
                    continue
                if rr.isError():
                    last = ModbusAnswer(rr, kind, start, count)
                    continue
                answers[(kind, start, count)] = list(rr.registers[:count])
                last = None
                break
            if last is not None:
                raise last
        return {r.name: decode(r, extract(r, answers)) for r in regs}

    # -- a meter's state -------------------------------------------------------------------

    def _failed(self, d: Device, ts: int, error: str) -> None:
        d.failures += 1
        d.next_try_ts = ts + min(2 ** (d.failures - 1), self.backoff_max) * self.interval_ms
        if d.failures == 1:
            d.down_since, d.error = ts, error
            log.error("source %s: meter %s (%s) is not answering: %s; polling it less often until it answers",
                      self.name, d.name, d.where, error)
            if self.health is not None:
                self.health.set(self._stage(d), "retrying", error, retries=1)
        else:
            d.error = error
            log.debug("source %s: meter %s still not answering (%d polls): %s", self.name, d.name, d.failures, error)
            if self.health is not None:
                self.health.set(self._stage(d), "retrying", error, retries=d.failures)

    def _answered(self, d: Device, ts: int, values: dict[str, float]) -> None:
        if d.failures:
            log.info("source %s: meter %s (%s) answers again after %d failed polls", self.name, d.name, d.where,
                     d.failures)
            if self.health is not None:
                self.health.set(self._stage(d), "running", None, retries=0)
        d.failures, d.next_try_ts, d.error, d.down_since = 0, 0, None, None
        d.last_values, d.last_ok_ts = values, ts

    def _count(self, d: Device, ts: int, value: float) -> tuple[list[Reading], list[Rejected]]:
        reg = self._plan(d)[2]
        s = counters.step(self._counters.get(d.name), value, ts, reg, self.interval_ms, d.max_power_kw,
                          self.max_spread)
        self._counters[d.name] = s.state
        d.events[s.event] = d.events.get(s.event, 0) + 1
        readings = [Reading(d.site, d.building, d.meter, t, kwh, self.name) for t, kwh in s.readings]
        rejected = []
        if s.problem:
            if s.event == "reset":
                log.warning("source %s: meter %s: %s", self.name, d.name, s.problem)
            rejected.append(Rejected(s.problem, s.raw, self.name, f"{d.name}@{ts}"))
        return readings, rejected


class ModbusAnswer(Exception):
    """A meter's exception response."""

    _CODES = {1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
              5: "acknowledge", 6: "device busy", 10: "gateway path unavailable",
              11: "gateway target device failed to respond"}

    def __init__(self, response: Any, kind: str, start: int, count: int):
        code = getattr(response, "exception_code", None)
        text = self._CODES.get(code, "unknown")
        super().__init__(f"exception {code} ({text}) reading {count} {kind} registers at {start}")


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."
