"""A real pymodbus server for tests: meters as unit ids, registers a test sets, requests counted.

``MeterServer`` serves one TCP port (or a serial port) from a thread of its own, with pymodbus's
SimDevice datastore. Every request goes through :meth:`MeterServer._action`, which counts it
(``requests``: (unit, function code, address, count)), writes the registers the test set into the
block the server answers from, and can make a unit fail: ``dead`` units answer exception 11
(gateway target failed to respond), ``silent`` units do not answer at all (the client times out).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
import tty

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.registermap import Register, encode

SIZE = 4096  # registers 0..4095 of each kind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MeterServer:
    def __init__(self, units, port: int | None = None, serial: str | None = None, framer=FramerType.SOCKET):
        self.units = list(units)
        self.port = port or (None if serial else free_port())
        self.serial = serial
        self.framer = framer
        self.regs: dict[tuple[int, str], dict[int, int]] = {(u, k): {} for u in self.units for k in ("holding", "input")}
        self.requests: list[tuple[int, int, int, int]] = []
        self.dead: set[int] = set()
        self.silent: set[int] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the test sets ------------------------------------------------------------------

    def set(self, unit: int, register: Register, value: float) -> None:
        """Serve ``value`` (in the register's unit) in ``register``'s words on ``unit``."""
        self.set_words(unit, register.kind, register.address, encode(register, value))

    def set_words(self, unit: int, kind: str, address: int, words: list[int]) -> None:
        with self._lock:
            for i, w in enumerate(words):
                self.regs[(unit, kind)][address + i] = w

    def count(self, unit: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if unit is None or r[0] == unit)

    # -- pymodbus --------------------------------------------------------------------------

    async def _action(self, unit, function_code, start_address, address, count, current_registers, set_values):
        with self._lock:
            self.requests.append((unit, function_code, address, count))
            if unit in self.dead:
                return ExcCodes.GATEWAY_NO_RESPONSE
            kind = "holding" if function_code == 3 else "input"
            for a, w in self.regs[(unit, kind)].items():
                current_registers[a - start_address] = w
            silent = unit in self.silent
        if silent:
            await asyncio.sleep(3600)
        return None

    def _devices(self):
        out = []
        for u in self.units:
            block = lambda: [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)]  # noqa: E731
            bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
            out.append(SimDevice(id=u, simdata=(bits, bits, block(), block()),
                                 action=functools.partial(self._action, u)))
        return out

    def start(self) -> "MeterServer":
        self._thread = threading.Thread(target=self._run, name="meter-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the pymodbus server did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        if self.serial:
            self._server = ModbusSerialServer(self._devices(), port=self.serial, framer=FramerType.RTU, baudrate=9600)
        else:
            self._server = ModbusTcpServer(self._devices(), address=("127.0.0.1", self.port), framer=self.framer)
        await self._server.serve_forever(background=True)

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
        try:
            fut.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


class PtyPair:
    """Two pseudo-terminals joined like a null-modem cable: bytes written to one's slave come out
    of the other's slave (a thread copies between the two masters). ``a`` and ``b`` are the slave
    paths to open as serial ports."""

    def __init__(self):
        self._m1, s1 = os.openpty()
        self._m2, s2 = os.openpty()
        for fd in (s1, s2):
            tty.setraw(fd)
        self.a, self.b = os.ttyname(s1), os.ttyname(s2)
        self._slaves = (s1, s2)
        self._stop = threading.Event()
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="pty-pair", daemon=True)

    def start(self) -> "PtyPair":
        self._thread.start()
        return self

    def _pump(self) -> None:
        import select

        peer = {self._m1: self._m2, self._m2: self._m1}
        while not self._stop.is_set():
            ready, _, _ = select.select([self._m1, self._m2, self._r], [], [])
            if self._r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                os.write(peer[fd], data)

    def close(self) -> None:
        self._stop.set()
        os.write(self._w, b"x")
        self._thread.join(5)
        for fd in (self._m1, self._m2, *self._slaves, self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
