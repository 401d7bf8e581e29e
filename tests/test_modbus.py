"""The modbus source against a real pymodbus server: decoding, coalescing, counters, dead meters, restart, RTU."""

import logging
import threading

import pytest
from pymodbus import FramerType

from gateway.readings import Rejected
from gateway.registermap import DATA_TYPES, load_map
from gateway.sources.modbus import ModbusSource
from modbus_helpers import MeterServer, PtyPair

T0 = 1_700_000_000.0  # not on a minute boundary: the first poll is at the next one
MIN = 60_000


class Clock:
    """The wall clock the source aligns to; waiting moves it on at once."""

    def __init__(self, t=T0):
        self.t = t

    def wall(self):
        return self.t

    def wait(self, stop, seconds):
        self.t += seconds
        return stop.is_set()


@pytest.fixture
def server():
    srv = MeterServer([1, 2, 3]).start()
    yield srv
    srv.stop()


def device(srv, unit, map_="eastron-sdm630", **kw):
    spec = dict(name=f"m{unit}", unit_id=unit, site="0", building=str(100 + unit), meter="electricity",
                map=load_map(map_) if isinstance(map_, str) else map_, host="127.0.0.1", port=srv.port,
                timeout_s=0.5, retries=0)
    return {**spec, **kw}


def source(devices, clock=None, **kw):
    clock = clock or Clock()
    return ModbusSource("mb", devices, wall=clock.wall, wait=clock.wait, **kw), clock


def polls(src, position=None):
    stop = threading.Event()
    gen = src.batches(position, stop)
    return gen


SDM = load_map("eastron-sdm630")
E = SDM.register("total_import_kwh")


def test_every_data_type_word_and_byte_order_decodes_from_the_meter(server, tmp_path):
    values = {"u16": 54321, "i16": -1234, "u32": 3_000_000_000, "i32": -2_000_000_000, "u64": 2**63 + 12345,
              "f32": 1234.5, "f64": -98765.4321}
    lines, address = [], 0
    for dt in DATA_TYPES:
        for wo in ("big", "little"):
            for bo in ("big", "little"):
                kind = "holding" if address % 8 else "input"
                lines.append(f"  - {{name: {dt}_{wo}_{bo}, type: {kind}, address: {address}, data_type: {dt}, "
                             f"word_order: {wo}, byte_order: {bo}, unit: kW, meaning: power}}")
                address += DATA_TYPES[dt][1]
    lines.append(f"  - {{name: e, type: input, address: {address}, data_type: u32, unit: kWh, meaning: energy}}")
    (tmp_path / "all.yaml").write_text("maker: T\nmodel: T\ndocument: T\nregisters:\n" + "\n".join(lines) + "\n")
    m = load_map(tmp_path / "all.yaml")
    for r in m.registers:
        server.set(1, r, values.get(r.data_type, 7))
    src, _ = source([device(server, 1, m)])
    next(polls(src))
    got = src.status()["m1"]["values"]
    for r in m.of_meaning("power"):
        assert got[r.name] == pytest.approx(values[r.data_type], rel=1e-7), r.name


def test_contiguous_registers_are_one_request_and_far_ones_are_not(server, tmp_path):
    regs = "\n".join(f"  - {{name: r{i}, type: input, address: {i * 2}, data_type: f32, unit: kWh, meaning: energy}}"
                     for i in range(100))  # 200 words: two requests of at most 125
    (tmp_path / "wide.yaml").write_text(f"maker: T\nmodel: T\ndocument: T\nregisters:\n{regs}\n")
    src, _ = source([device(server, 1, load_map(tmp_path / "wide.yaml")), device(server, 2)])
    next(polls(src))
    assert [(a, c) for u, _, a, c in server.requests if u == 1] == [(0, 124), (124, 76)]
    assert server.count(2) == 3  # the SDM630's three registers are far apart: three requests


def test_deltas_become_interval_energy_with_site_building_and_meter(server):
    server.set(1, E, 1000.0)
    src, _ = source([device(server, 1, meter="chilledwater")])
    gen = polls(src)
    first = next(gen)
    assert first.readings == [] and first.position["meters"]["m1"][0] == 1000.0
    server.set(1, E, 1002.5)
    (r,) = next(gen).readings
    assert (r.site, r.building, r.meter, r.value, r.source) == ("0", "101", "chilledwater", 2.5, "mb")
    assert r.ts % MIN == 0 and r.ts == first.position["meters"]["m1"][1] + MIN


def test_rollover_reset_and_spike(server, tmp_path):
    (tmp_path / "u16.yaml").write_text(
        "maker: T\nmodel: T\ndocument: T\nregisters:\n"
        "  - {name: e, type: holding, address: 10, data_type: u16, scale: 10, unit: Wh, meaning: energy}\n")
    m = load_map(tmp_path / "u16.yaml")
    e = m.register("e")  # wraps at 655360 Wh
    src, _ = source([device(server, 1, m, max_power_kw=60)])  # at most 1 kWh a minute
    gen = polls(src)
    server.set(1, e, 655_000)
    next(gen)
    server.set(1, e, 100)  # wrapped: 360 + 100 Wh
    assert [r.value for r in next(gen).readings] == [pytest.approx(0.46)]
    server.set(1, e, 50_000)  # 49.9 kWh in a minute: impossible under 60 kW
    b = next(gen)
    assert b.readings == [] and "over the meter's max_power_kw 60" in b.rejected[0].reason
    server.set(1, e, 50_500)
    assert [r.value for r in next(gen).readings] == [pytest.approx(0.5)]  # goes on from the spike's value
    server.set(1, e, 20_000)  # backwards, not near a wrap: a reset, a new series
    b = next(gen)
    assert b.readings == [] and b.rejected[0].reason.startswith("counter reset")
    server.set(1, e, 20_300)
    assert [r.value for r in next(gen).readings] == [pytest.approx(0.3)]
    assert src.status()["m1"]["events"] == {"baseline": 1, "rollover": 1, "spike": 1, "ok": 2, "reset": 1}


def test_a_gap_is_spread_evenly_over_the_missed_intervals(server):
    server.set(1, E, 10.0)
    src, clock = source([device(server, 1)])
    gen = polls(src)
    t1 = next(gen).position["meters"]["m1"][1]
    clock.t += 150  # the gateway was away for two more boundaries
    server.set(1, E, 13.0)
    b = next(gen)
    assert [(r.ts - t1, r.value) for r in b.readings] == [(MIN, 1.0), (2 * MIN, 1.0), (3 * MIN, 1.0)]


def test_a_gap_longer_than_max_spread_is_quarantined_whole(server):
    server.set(1, E, 10.0)
    src, clock = source([device(server, 1)], max_spread_intervals=2)
    gen = polls(src)
    next(gen)
    clock.t += 600
    server.set(1, E, 20.0)
    b = next(gen)
    assert b.readings == [] and b.rejected[0].reason.startswith("gap of 11 intervals: 10 kWh")


def test_a_dead_meter_is_logged_once_backs_off_and_the_others_go_on(server, caplog):
    for u in (1, 2, 3):
        server.set(u, E, 100.0)
    health = []

    class Health:
        def set(self, stage, state, error=None, retries=None):
            health.append((stage, state))

    src, _ = source([device(server, u) for u in (1, 2, 3)], health=Health())
    gen = polls(src)
    next(gen)
    server.dead.add(2)
    caplog.set_level(logging.DEBUG, logger="gateway.sources.modbus")
    values = {1: 100.0, 3: 100.0}
    counts = []
    for _ in range(6):
        for u in values:
            values[u] += 1
            server.set(u, E, values[u])
        b = next(gen)
        assert sorted(r.building for r in b.readings) == ["101", "103"]
        counts.append(server.count(2))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "meter m2" in errors[0].getMessage()
    assert counts[-1] - counts[0] < 5  # backed off: not asked at every one of the 6 boundaries
    assert src.status()["m2"]["state"] == "down" and "exception 11" in src.status()["m2"]["error"]
    assert health[0] == ("meter mb/m2", "retrying")
    server.dead.clear()
    server.set(2, E, 106.0)
    for _ in range(16):  # until its back-off lets it be tried again
        b = next(gen)
        if any(r.building == "102" for r in b.readings):
            break
    assert sum(r.value for r in b.readings if r.building == "102") == pytest.approx(6.0)  # the gap, spread
    assert [r for r in caplog.records if r.levelno == logging.INFO and "answers again" in r.getMessage()]
    assert health[-1] == ("meter mb/m2", "running") and src.status()["m2"]["state"] == "ok"


def test_a_silent_meter_times_out_without_holding_up_another_port():
    quiet, ok = MeterServer([1]).start(), MeterServer([1]).start()
    try:
        quiet.silent.add(1)
        ok.set(1, E, 5.0)
        src, _ = source([dict(device(quiet, 1), name="quiet", timeout_s=0.2), dict(device(ok, 1), name="ok")])
        b = next(polls(src))
        assert b.position["meters"] == {"ok": [5.0, b.position["meters"]["ok"][1]]}
        assert src.status()["quiet"]["state"] == "down"
    finally:
        quiet.stop()
        ok.stop()


def test_restart_resumes_from_the_committed_counters_without_double_counting(server):
    server.set(1, E, 500.0)
    clock = Clock()
    src, _ = source([device(server, 1)], clock)
    gen = polls(src)
    next(gen)
    server.set(1, E, 501.0)
    committed = next(gen)
    assert [r.value for r in committed.readings] == [1.0]
    gen.close()  # the gateway stops; the position was committed with that batch
    server.set(1, E, 503.0)
    again, _ = source([device(server, 1)], clock)
    b = next(polls(again, committed.position))
    assert [r.value for r in b.readings] == [2.0]
    assert b.readings[0].ts == committed.readings[0].ts + MIN


def test_rtu_over_tcp(tmp_path):
    srv = MeterServer([7], framer=FramerType.RTU).start()
    try:
        srv.set(7, E, 42.0)
        src, _ = source([dict(device(srv, 7), transport="rtu-over-tcp")])
        assert next(polls(src)).position["meters"]["m7"][0] == 42.0
    finally:
        srv.stop()


def test_rtu_on_a_serial_line_over_a_pseudo_terminal_pair():
    pair = PtyPair().start()
    srv = MeterServer([1, 2], serial=pair.a).start()
    try:
        srv.set(1, E, 10.0)
        srv.set(2, E, 20.0)
        devs = [dict(name=f"s{u}", unit_id=u, site="0", building=str(u), meter="electricity", map=SDM,
                     transport="rtu", serial=pair.b, baudrate=9600, timeout_s=1.0, retries=1) for u in (1, 2)]
        src, _ = source(devs)
        gen = polls(src)
        assert next(gen).position["meters"] == {"s1": [10.0, pytest.approx(0, abs=1e13)],
                                                "s2": [20.0, pytest.approx(0, abs=1e13)]}
        srv.set(1, E, 10.5)
        srv.set(2, E, 21.0)
        assert sorted(r.value for r in next(gen).readings) == [0.5, 1.0]
        gen.close()
    finally:
        srv.stop()
        pair.close()


def test_the_source_cannot_wait_and_rejected_records_say_where():
    src, _ = source([])
    assert src.can_wait is False
    assert Rejected._fields == ("reason", "raw", "source", "where")


def test_a_config_builds_the_source_and_a_gateway_gives_it_its_health(tmp_path):
    from gateway.config import validate
    from gateway.runner import build_source

    cfg = validate({"thing": "t", "publisher": {"type": "memory"}, "sources": [
        {"type": "modbus", "name": "site-a", "jitter_s": 5, "devices": [
            {"map": "carlo-gavazzi-em24", "host": "127.0.0.1", "port": 1502, "unit_id": 4, "site": "3",
             "building": "7", "meter": "hotwater", "max_power_kw": 80}]}]}, tmp_path)
    src = build_source(cfg.sources[0])
    assert isinstance(src, ModbusSource) and src.can_wait is False and src.health is None
    (d,) = src.devices
    assert (d.name, d.unit_id, d.meter, d.max_power_kw, d.energy_register.name) == (
        "127.0.0.1#4", 4, "hotwater", 80, "kwh_import_total")
    assert 0 <= src._jitter(d) < 5
