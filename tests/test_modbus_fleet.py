"""The simulated Modbus fleet, read by real pymodbus clients and decoded with the shipped maps."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from emulator.modbus_fleet import DEVICE_COLUMNS, FleetServer
from gateway.errors import ConfigError
from gateway.registermap import DATA_TYPES, decode, extract, load_map
from gateway.sources.simulator import SimulatorSource

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_040.0  # a whole minute
MIXED = ["eastron-sdm630", "schneider-iem3000", "carlo-gavazzi-em24"]


class Clock:
    """A clock the test moves."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def read(device, timeout: float = 2.0) -> dict[str, float]:
    """Every register of ``device``'s map, read in plan()'s requests and decoded."""
    regmap = load_map(device.map)
    answers = {}
    with ModbusTcpClient(device.host, port=device.port, timeout=timeout, retries=0) as client:
        for kind, start, count in regmap.plan():
            fn = client.read_holding_registers if kind == "holding" else client.read_input_registers
            rr = fn(start, count=count, device_id=device.unit_id)
            if rr.isError():
                raise AssertionError(f"exception {rr.exception_code}")
            answers[(kind, start, count)] = rr.registers
    return {r.name: decode(r, extract(r, answers)) for r in regmap.registers}


def energy_names(map_name: str) -> list[str]:
    return [r.name for r in load_map(map_name).of_meaning("energy")]


def tolerance(map_name: str, name: str, value: float) -> float:
    """How far a decoded counter may be from the exact one: one unit of scale, or f32 precision."""
    r = load_map(map_name).register(name)
    if DATA_TYPES[r.data_type][2]:
        return r.scale * 1.0001
    return abs(value) * (2**-23 if r.data_type == "f32" else 2**-52) + 1e-9


@pytest.fixture
def clock():
    return Clock()


def wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")


def test_values_read_back_equal_the_simulators_cumulative_energy(clock):
    with FleetServer(meters=9, ports=1, base_port=0, maps=MIXED, clock=clock) as fleet:
        sim = SimulatorSource("x", meters=9, seed=0, start_ms=fleet.start_ms, speed=None)
        assert [d.building for d in fleet.devices] == sim.buildings
        assert [d.meter for d in fleet.devices] == sim.meter_types
        assert [d.map for d in fleet.devices] == MIXED * 3
        clock.t = T0 + 150  # two whole minutes and half of the third
        ticks = [sim.values_at(fleet.start_ms + k * 60_000)[0] for k in (1, 2, 3)]
        for i, d in enumerate(fleet.devices):
            kwh = fleet.initial_kwh(d.port, d.unit_id) + ticks[0][i] + ticks[1][i] + 0.5 * ticks[2][i]
            got = read(d)
            regmap = load_map(d.map)
            for r in regmap.registers:
                if r.meaning == "energy":
                    want = kwh / r.to_kwh
                    assert want - tolerance(d.map, r.name, want) <= got[r.name] <= want + tolerance(
                        d.map, r.name, want), (d, r.name)
                else:
                    want = ticks[2][i] * 60 / r.to_kwh  # kWh in a minute → kW, in the map's unit
                    assert got[r.name] == pytest.approx(want, rel=1e-3, abs=r.scale), (d, r.name)
            assert got[energy_names(d.map)[0]] > 0
            assert fleet.devices[i].max_power_kw > ticks[2][i] * 60


def test_counters_increase_monotonically_with_the_clock(clock):
    with FleetServer(meters=3, base_port=0, maps=MIXED, clock=clock) as fleet:
        seen = {d: [] for d in fleet.devices}
        for step in range(12):
            clock.t = T0 + step * 17.0
            for d in fleet.devices:
                seen[d].append(read(d)[energy_names(d.map)[0]])
        for d, values in seen.items():
            assert all(b >= a for a, b in zip(values, values[1:])), (d, values)
            assert values[-1] > values[0]


def test_speed_runs_fleet_time_faster():
    with FleetServer(meters=1, base_port=0, speed=3600.0) as fleet:  # an hour a second
        d = fleet.devices[0]
        name = energy_names(d.map)[0]
        first = read(d)[name]
        assert wait_for(lambda: read(d)[name] > first + 1.0)


def test_requests_are_counted_per_meter(clock):
    with FleetServer(meters=4, base_port=0, maps=MIXED, clock=clock) as fleet:
        d = fleet.devices[1]
        read(d)
        regmap = load_map(d.map)
        assert fleet.requests_by[(d.port, d.unit_id)] == len(regmap.plan())
        assert fleet.requests == fleet.requests_by[(d.port, d.unit_id)]


def test_a_request_longer_than_the_maps_max_count_or_over_a_gap_is_refused(clock, tmp_path):
    path = tmp_path / "capped.yaml"
    regs = "".join(f"  - {{name: e{i}, type: input, address: {10 + i}, data_type: u16, unit: kWh, meaning: energy}}\n"
                   for i in range(12))
    path.write_text(f"maker: test\nmodel: capped\ndocument: none\nmax_count: 11\nregisters:\n{regs}")
    with FleetServer(meters=1, base_port=0, maps=[str(path)], clock=clock) as fleet:
        d = fleet.devices[0]
        with ModbusTcpClient(d.host, port=d.port, timeout=2, retries=0) as client:
            too_long = client.read_input_registers(10, count=12, device_id=1)
            unmapped = client.read_input_registers(9, count=2, device_id=1)
        assert too_long.isError() and too_long.exception_code == 3
        assert unmapped.isError() and unmapped.exception_code == 2
        assert len(load_map(path).plan()) == 2
        assert len(set(read(d).values())) == 1  # plan()'s two requests are answered, every counter alike


def test_timeout_per_unit_answers_nothing_and_is_recorded(clock, tmp_path):
    log = tmp_path / "injected.csv"
    with FleetServer(meters=3, base_port=0, clock=clock, timeouts=[(0, 2)], log_path=log) as fleet:
        dead, alive = fleet.devices[1], fleet.devices[0]
        with pytest.raises((ModbusException, AssertionError)):
            read(dead, timeout=0.3)
        assert read(alive)  # the others are unaffected
        assert [(i.port, i.unit, i.kind) for i in fleet.injected] == [(dead.port, 2, "timeout")]
        fleet.set_timeout(dead.port, 2, False)
        assert read(dead)
        rows = list(csv.DictReader(log.open()))
        assert [(int(r["port"]), int(r["unit"]), r["kind"]) for r in rows] == [(dead.port, 2, "timeout")]
        assert int(rows[0]["ts"]) == int(T0 * 1000)


def test_exception_per_unit_is_the_code_given_and_recorded(clock, tmp_path):
    log = tmp_path / "injected.jsonl"
    with FleetServer(meters=2, base_port=0, clock=clock, exceptions={(0, 1): 6}, log_path=log) as fleet:
        d = fleet.devices[0]
        with ModbusTcpClient(d.host, port=d.port, timeout=2, retries=0) as client:
            rr = client.read_input_registers(load_map(d.map).registers[0].address, count=2, device_id=1)
        assert rr.isError() and rr.exception_code == 6
        assert read(fleet.devices[1])
        assert {(i.unit, i.kind) for i in fleet.injected} == {(1, "exception")}
        assert '"kind": "exception"' in log.read_text()
        fleet.set_exception(d.port, 1, None)
        assert read(d)


def test_reset_at_a_time_sends_the_counter_to_zero(clock):
    with FleetServer(meters=2, base_port=0, maps=["carlo-gavazzi-em24"], clock=clock, resets={(0, 1): 90}) as fleet:
        d = fleet.devices[0]
        name = energy_names(d.map)[0]
        clock.t = T0 + 60
        before = read(d)[name]
        at_reset = fleet.consumed_kwh(d.port, 1, T0 + 90)
        clock.t = T0 + 150
        after = read(d)[name]
        since = fleet.consumed_kwh(d.port, 1) - at_reset
        want = since / load_map(d.map).register(name).to_kwh
        assert after < before
        assert want - tolerance(d.map, name, want) <= after <= want
        assert [(i.ts, i.unit, i.kind) for i in fleet.injected] == [(int((T0 + 90) * 1000), 1, "reset")]
        other = fleet.devices[1]
        assert read(other)[name] > fleet.initial_kwh(other.port, 2) / load_map(d.map).register(name).to_kwh - 1


def test_reset_now_through_the_api(clock):
    with FleetServer(meters=1, base_port=0, clock=clock) as fleet:
        d = fleet.devices[0]
        name = energy_names(d.map)[0]
        clock.t = T0 + 30
        fleet.reset(d.port, 1)
        assert read(d)[name] == 0.0
        clock.t = T0 + 45
        assert read(d)[name] > 0.0
        assert [i.kind for i in fleet.injected] == ["reset"]


@pytest.mark.parametrize("map_name", ["schneider-iem3000", "carlo-gavazzi-em24"])
def test_rollover_starts_near_the_wrap_and_wraps(clock, map_name):
    with FleetServer(meters=2, base_port=0, maps=[map_name], clock=clock, rollovers=[(0, 2)],
                     rollover_after_s=120) as fleet:
        d = fleet.devices[1]
        r = [r for r in load_map(map_name).of_meaning("energy") if r.modulus is not None][0]
        start = read(d)[r.name] % r.modulus  # a signed counter is read modulo the same value
        assert start > 0.99 * r.modulus  # just below the wrap
        clock.t = T0 + 600
        assert read(d)[r.name] % r.modulus < start  # wrapped
        assert read(fleet.devices[0])[r.name] < 0.5 * r.modulus  # the other meter is not armed
        assert [(i.port, i.unit, i.kind) for i in fleet.injected] == [(d.port, 2, "rollover")]
        assert f"wraps at {round(r.modulus / r.scale)}" in fleet.injected[0].detail


def test_rollover_of_a_float_counter_without_a_declared_wrap_is_refused(clock):
    with pytest.raises(ConfigError, match=r"^rollovers\[0:1\]: map eastron-sdm630's energy registers are floats"):
        FleetServer(meters=1, base_port=0, maps=["eastron-sdm630"], clock=clock, rollovers=[(0, 1)])


@pytest.mark.parametrize("kind", ["timeout", "exception", "reset", "rollover"])
def test_each_fault_at_a_rate_is_observable_and_recorded(clock, kind):
    rates = {f"{kind}_rate": 1.0}
    with FleetServer(meters=4, base_port=0, maps=["carlo-gavazzi-em24"], clock=clock, **rates) as fleet:
        d = fleet.devices[2]
        name = energy_names(d.map)[0]
        if kind in ("timeout", "exception"):
            with pytest.raises((ModbusException, AssertionError)):
                read(d, timeout=0.3)
        elif kind == "reset":  # every meter at every interval boundary
            clock.t = T0 + 60
            assert read(d)[name] == 0.0
        else:
            modulus = load_map(d.map).register(name).modulus
            assert read(d)[name] % modulus > 0.99 * modulus
        kinds = {(i.port, i.unit, i.kind) for i in fleet.injected}
        assert (d.port, d.unit_id, kind) in kinds


def test_several_ports_spread_the_meters(clock):
    with FleetServer(meters=300, ports=2, base_port=0, maps=MIXED, clock=clock) as fleet:
        ports = sorted({d.port for d in fleet.devices})
        assert len(ports) == 2 and ports == sorted(fleet.ports)
        for port in ports:
            units = [d.unit_id for d in fleet.devices if d.port == port]
            assert units == list(range(1, 151))
        last = fleet.devices[-1]
        assert (last.port, last.unit_id) == (fleet.ports[1], 150)
        assert read(last)
        assert read(fleet.devices[0])
        assert fleet.requests_by[(fleet.ports[1], 150)] > 0 and fleet.requests_by[(fleet.ports[0], 1)] > 0


def test_too_many_meters_for_the_ports_is_refused():
    with pytest.raises(ConfigError, match=r"^ports: 9 ports serve at most 2223 meters .*2380 need at least 10$"):
        FleetServer(meters=2380, ports=9)


def test_devices_csv_is_written(clock, tmp_path):
    path = tmp_path / "fleet" / "devices.csv"
    with FleetServer(meters=5, ports=2, base_port=0, maps=MIXED, clock=clock, devices_csv=path) as fleet:
        rows = list(csv.DictReader(path.open()))
        assert tuple(rows[0]) == DEVICE_COLUMNS
        assert [(r["name"], r["host"], int(r["port"]), int(r["unit_id"]), r["map"]) for r in rows] == [
            (f"{d.host}:{d.port}#{d.unit_id}", d.host, d.port, d.unit_id, d.map) for d in fleet.devices]
        assert all(float(r["max_power_kw"]) > 0 and r["meter"] and r["building"] and r["site"] for r in rows)


def test_the_devices_csv_is_a_valid_modbus_source(clock, tmp_path):
    from gateway import config as cfg

    path = tmp_path / "devices.csv"
    with FleetServer(meters=500, ports=3, base_port=0, maps=MIXED, clock=clock, devices_csv=path):
        raw = {"thing": "gw-1", "sources": [{"type": "modbus", "name": "fleet", "devices_csv": str(path)}],
               "publisher": {"type": "memory"}, "buffer": {"path": str(tmp_path / "buffer.db")}}
        source = cfg.validate(raw, tmp_path).sources[0]
    devices = source["devices"] if isinstance(source, dict) else source.devices
    assert len(devices) == 500


def test_replay_of_the_ashrae_sample(clock):
    from gateway import ashrae

    table = ashrae.read(ROOT / "data" / "sample" / "readings.csv.gz")
    first = table.ts_ms.min()
    with FleetServer(meters=None, base_port=0, maps=["carlo-gavazzi-em24"], clock=clock,
                     replay=ROOT / "data" / "sample" / "readings.csv.gz") as fleet:
        assert len(fleet.devices) == len(np.unique(table.building_id * 4 + table.meter))
        at_first = {(str(b), int(m)): v for b, m, t, v in zip(table.building_id, table.meter, table.ts_ms,
                                                               table.meter_reading) if t == first}
        clock.t = fleet.start_ms / 1000 + 3600  # the file's first hour is over
        from gateway.readings import METER_CODE

        checked = 0
        for d in fleet.devices:
            key = (d.building, METER_CODE[d.meter])
            if key in at_first:
                assert fleet.consumed_kwh(d.port, d.unit_id) == pytest.approx(at_first[key])
                name = energy_names(d.map)[0]
                want = (fleet.initial_kwh(d.port, d.unit_id) + at_first[key]) / load_map(d.map).register(name).to_kwh
                assert want - tolerance(d.map, name, want) <= read(d)[name] <= want
                checked += 1
        assert checked


def test_gateway_simulate_modbus_serves_until_interrupted(tmp_path):
    devices = tmp_path / "devices.csv"
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "gateway"), "simulate", "modbus", "--meters", "260", "--ports", "2",
         "--base-port", "0", "--maps", "mixed", "--exception", "1:3=6", "--log", str(tmp_path / "inj.csv"),
         "--devices-csv", str(devices)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        wait_for(lambda: devices.exists() and len(devices.read_text().splitlines()) == 261 or proc.poll() is not None,
                 timeout=30)
        assert proc.poll() is None, proc.communicate()
        rows = list(csv.DictReader(devices.open()))
        d = next(r for r in rows if r["unit_id"] == "5")
        from emulator.modbus_fleet import Device

        assert read(Device(d["name"], d["host"], int(d["port"]), 5, d["map"], "", "", "", 0.0))
        faulty = rows[130 + 2]  # rows are in meter order: port index 1 starts at the 131st
        port = int(faulty["port"])
        assert faulty["unit_id"] == "3" and port != int(rows[0]["port"])
        with pytest.raises(AssertionError, match="^exception 6$"):
            read(Device(faulty["name"], faulty["host"], port, 3, faulty["map"], "", "", "", 0.0))
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.splitlines()[0].startswith("serving 260 meters on 127.0.0.1:")
    assert "requests served, 1 faults injected" in out.splitlines()[-1]
    assert "exception" in (tmp_path / "inj.csv").read_text()
