"""The SQLite buffer: put / claim / ack, lanes, late readings, budget, quarantine, migrations."""

from __future__ import annotations

import math
import sqlite3

import pytest

from gateway.buffer import MIGRATIONS, Buffer
from gateway.errors import BufferError, BufferFull, DiskFull, SchemaError
from gateway.readings import Reading

from faults import DiskFullOn, FailingConnection

T0 = 1_451_606_400_000  # 2016-01-01T00:00:00Z
MIN = 60_000


def reading(i: int, meter: str = "1", value: float | None = None, site: str = "0", kind: str = "electricity") -> Reading:
    return Reading(site, meter, kind, T0 + i * MIN, float(i) if value is None else value, "test")


def readings(n: int, start: int = 0, meters: int = 1) -> list[Reading]:
    return [reading(start + i, meter=str(m)) for i in range(n) for m in range(1, meters + 1)]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "buffer.db"


@pytest.fixture
def buf(db_path):
    b = Buffer(db_path, live_window_ms=10**12)  # no live lane unless a test asks for one
    yield b
    b.close()


def drain(b: Buffer, limit: int = 100) -> list[tuple]:
    """Claim and ack everything; return the rows in claim order."""
    out = []
    while (c := b.claim(limit)) is not None:
        out.extend(c.rows)
        b.ack(c)
    return out


# ---------------------------------------------------------------- storage


def test_wal_mode_and_time_first_key(buf, db_path):
    assert buf.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert buf.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    sql = buf.db.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()[0]
    assert "PRIMARY KEY(ts, meter)" in sql and "WITHOUT ROWID" in sql


def test_put_claim_ack_roundtrip(buf):
    result = buf.put(readings(250), source="s", position=250)
    assert result.stored == 250 and result.quarantined == 0
    c = buf.claim(100)
    assert len(c) == 100 and [r[0] for r in c.rows] == sorted(r[0] for r in c.rows)
    assert buf.pending() == 250  # claimed is not acknowledged
    buf.ack(c)
    assert buf.pending() == 150
    rest = drain(buf)
    assert len(rest) == 150 and buf.pending() == 0
    assert buf.stats["delivered"] == 250


def test_nothing_is_removed_before_ack(db_path):
    b = Buffer(db_path, live_window_ms=10**12)
    b.put(readings(300))
    c1 = b.claim(100)
    c2 = b.claim(100)
    b.ack(c2)  # acknowledged out of order: the cursor must wait for c1
    assert b.backlog.cursor < c1.lo or b.backlog.cursor == (0, 0)
    b.close()
    # A crash: claims are gone; acknowledgements up to the cursor stay, and so does c2's, ahead of it.
    again = Buffer(db_path, live_window_ms=10**12)
    assert again.pending() == 200
    rows = drain(again)
    assert len(rows) == 200 and {r[0] for r in rows}.isdisjoint(r[0] for r in c2.rows)
    assert again.stats["delivered"] == 300 and again.pending() == 0
    again.close()


def test_cursor_survives_restart_and_reclaim_deletes_acked_rows(db_path):
    b = Buffer(db_path, reclaim_every=10**9, live_window_ms=10**12)
    b.put(readings(500))
    for _ in range(3):
        b.ack(b.claim(100))
    b.close()
    b = Buffer(db_path, reclaim_every=10**9, live_window_ms=10**12)
    assert b.pending() == 200
    assert b.db.execute("SELECT count(*) FROM readings").fetchone()[0] == 500  # not deleted yet
    assert b.reclaim() == 300
    assert b.db.execute("SELECT count(*) FROM readings").fetchone()[0] == 200
    assert len(drain(b)) == 200
    b.close()


def test_position_commits_with_the_readings(buf, monkeypatch):
    buf.put(readings(10), source="replay", position=10)
    assert buf.position("replay") == 10

    class Boom(Exception):
        pass

    real = buf._note_late

    def explode(*args):
        real(*args)
        raise Boom("disk on fire")

    monkeypatch.setattr(buf, "_note_late", explode)
    with pytest.raises(Boom):
        buf.put(readings(10, start=10), source="replay", position=20)
    assert buf.position("replay") == 10  # neither the readings nor the position
    assert buf.pending() == 10


# ---------------------------------------------------------------- validation


BAD = [
    (Reading("0", "1", "electricity", T0, math.nan, "t"), "value: nan is not finite"),
    (Reading("0", "1", "electricity", T0, math.inf, "t"), "value: inf is not finite"),
    (Reading("0", "1", "electricity", T0, -1.5, "t"), "value: -1.5 is negative"),
    (Reading("0", "1", "electricity", T0, "12", "t"), "value: '12' is not a number"),
    (Reading("0", "1", "electricity", T0, None, "t"), "value: None is not a number"),
    (Reading("0", "1", "electricity", T0, True, "t"), "value: True is not a number"),
    (Reading("0", "1", "gas", T0, 1.0, "t"), "meter: 'gas' is not one of electricity, chilledwater, steam, hotwater"),
    (Reading("0", "1", "electricity", 1_451_606_400, 1.0, "t"),
     "ts: 1451606400 is before 2000-01-01 (seconds instead of milliseconds?)"),
    (Reading("0", "1", "electricity", 4_102_444_800_000, 1.0, "t"), "ts: 4102444800000 is more than 24 h in the future"),
    (Reading("0", "1", "electricity", float(T0), 1.0, "t"), "ts: 1451606400000.0 is not an integer of epoch milliseconds"),
    (Reading("0", "", "electricity", T0, 1.0, "t"), "building: '' is not a non-empty string"),
    (Reading(0, "1", "electricity", T0, 1.0, "t"), "site: 0 is not a non-empty string"),
    (Reading("0", "1", "electricity", T0, 10**400, "t"), "value: an integer of 1329 bits is too large for a reading"),
]


@pytest.mark.parametrize("bad,reason", BAD, ids=[r for _, r in BAD])
def test_bad_reading_is_quarantined_with_its_reason(buf, bad, reason):
    buf.put([reading(5)])  # the meter is known, so the batch below starts on the fast path
    result = buf.put([reading(0), bad, reading(1)])
    assert result.stored == 2 and result.quarantined == 1  # one bad reading never costs the others
    [q] = buf.quarantined()
    assert q["reason"] == reason
    assert q["kind"] == "reading" and q["raw"] == repr(tuple(bad))


def test_rejected_inputs_from_a_source_are_quarantined(buf):
    from gateway.readings import Rejected

    buf.put([], [Rejected("columns: 17 instead of 19", "997,1,2016-12-13 07:00:00", "replay", "x.csv:12")])
    [q] = buf.quarantined()
    assert (q["reason"], q["location"], q["source"]) == ("columns: 17 instead of 19", "x.csv:12", "replay")


def test_duplicate_with_same_value_is_ignored_and_different_value_quarantined(buf):
    buf.put([reading(0, value=5.0), reading(1, value=6.0)])
    result = buf.put([reading(0, value=5.0), reading(1, value=7.5)])
    assert (result.stored, result.duplicates, result.quarantined) == (0, 1, 1)
    [q] = buf.quarantined()
    assert q["reason"] == "duplicate (meter, ts) with a different value: stored 6.0, got 7.5"
    assert q["location"] == f"1:electricity@{T0 + MIN}"


def test_duplicate_inside_one_batch(buf):
    result = buf.put([reading(0, value=1.0), reading(0, value=1.0), reading(0, value=2.0)])
    assert (result.stored, result.duplicates, result.quarantined) == (1, 1, 1)


# ---------------------------------------------------------------- order: live first, late readings


def test_backlog_goes_in_time_order(buf):
    buf.put(readings(300, meters=3))
    rows = drain(buf, 50)
    assert [(r[0], r[1]) for r in rows] == sorted((r[0], r[1]) for r in rows)
    assert len(rows) == 900


def at(minutes: int):
    """A clock that reads T0 + ``minutes``: the readings' own time is now."""
    return lambda: (T0 + minutes * MIN) / 1000


def test_live_readings_go_ahead_of_the_backlog(db_path):
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=at(120))
    b.put(readings(120))  # two hours of backlog
    first = b.claim(5)
    assert first.lane == "live"
    assert all(r[0] >= T0 + 110 * MIN for r in first.rows)  # the newest ten minutes
    b.ack(first)
    b.put(readings(3, start=120))  # fresh readings while the backlog drains
    nxt = b.claim(100)
    assert nxt.lane == "live" and [r[0] for r in nxt.rows][-3:] == [T0 + (120 + i) * MIN for i in range(3)]
    b.ack(nxt)
    backlog = drain(b, 25)
    ts = [r[0] for r in backlog]
    assert ts == sorted(ts) and ts[0] == T0 and ts[-1] == T0 + 110 * MIN  # live: newer than now − window
    assert b.live is None  # merged once the backlog reached the floor
    assert b.pending() == 0 and b.stats["delivered"] == 123


def test_live_lane_survives_restart(db_path):
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=at(60))
    b.put(readings(60))
    b.ack(b.claim(100))  # the live lane's readings
    b.close()
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=at(60))
    assert b.live is not None and b.pending() == 51  # live: newer than now − window (50 min)
    rows = drain(b)
    assert len(rows) == 51 and max(r[0] for r in rows) == T0 + 50 * MIN
    b.close()


def test_a_backfill_of_old_data_goes_in_time_order(db_path):
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=at(10 * 365 * 24 * 60))  # ten years later
    b.put(readings(120))
    rows = drain(b, 7)
    assert b.live_floors == []  # nothing is live by the clock: no live lane
    assert [r[0] for r in rows] == [T0 + i * MIN for i in range(120)]
    b.close()


def test_late_reading_below_the_cursor_is_still_sent(buf):
    buf.put(readings(100, start=100))
    drain(buf)
    buf.reclaim()
    late = buf.put(readings(5, start=0))  # another source's older data arrives after
    assert late.stored == 5
    assert buf.pending() == 5
    rows = drain(buf)
    assert sorted(r[0] for r in rows) == [T0 + i * MIN for i in range(5)]
    assert buf.pending() == 0
    # and a reclaim keeps nothing that was not acknowledged
    buf.reclaim()
    assert buf.db.execute("SELECT count(*) FROM readings").fetchone()[0] == 0


def test_late_reading_between_claims_in_flight(buf):
    buf.put([reading(i) for i in range(0, 100, 2)])  # even minutes
    c = buf.claim(10)
    buf.put([reading(1)])  # an odd minute below the frontier, while c is in flight
    buf.ack(c)
    rows = drain(buf)
    keys = [r[0] for r in rows]
    assert T0 + MIN in keys and len(keys) == 41  # 40 remaining evens + the late one
    assert buf.pending() == 0


def test_late_reading_survives_restart(db_path):
    b = Buffer(db_path, live_window_ms=10**12)
    b.put(readings(10, start=10))
    drain(b)
    b.put(readings(2, start=0))
    b.close()
    b = Buffer(db_path, live_window_ms=10**12)
    assert b.pending() == 2
    assert sorted(r[0] for r in drain(b)) == [T0, T0 + MIN]
    b.close()


def test_release_all_hands_claims_out_again(buf):
    buf.put(readings(30))
    a = buf.claim(10)
    buf.claim(10)
    buf.ack(a)
    buf.release_all()  # a publish failed: everything unacknowledged goes again
    rows = drain(buf)
    assert len(rows) == 20 and rows[0][0] == T0 + 10 * MIN


def test_a_claim_acknowledged_out_of_order_then_released_counts_as_delivered_once(buf):
    buf.put(readings(20))
    a, b = buf.claim(10), buf.claim(10)
    buf.ack(b)  # b waits for a, which fails
    buf.release_all()
    assert [r[:3] for r in drain(buf)] == [r[:3] for r in a.rows]  # only a is sent again: b is a hole
    assert buf.stats["delivered"] == 20 and buf.pending() == 0


# ---------------------------------------------------------------- budget


def fill(b: Buffer, n: int, batch: int = 500, can_wait: bool = True) -> None:
    for i in range(0, n, batch):
        b.put(readings(batch, start=i), can_wait=can_wait)


def test_budget_drop_oldest_evicts_and_counts(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="drop_oldest", live_window_ms=10**12)
    fill(b, 30_000)
    st = b.status()
    assert st["evicted_oldest"] > 0
    assert st["used_bytes"] <= 256 * 1024 + 64 * 1024  # within a few pages of the budget
    assert st["rejected_newest"] == 0
    rows = drain(b, 1000)
    ts = [r[0] for r in rows]
    assert ts[-1] == T0 + 29_999 * MIN  # the newest reading is kept
    assert ts[0] > T0  # the oldest were dropped
    assert len(rows) + st["evicted_oldest"] == 30_000  # every reading is delivered or counted
    b.close()


def test_budget_reject_newest_makes_a_source_wait_with_its_position_kept(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="reject_newest", live_window_ms=10**12)
    i = 0
    with pytest.raises(BufferFull, match=r"^.*b\.db: the buffer's budget of 262144 bytes is used \(policy "
                       r"reject_newest\): the source waits until the forwarder has made room$"):
        for i in range(0, 30_000, 500):
            b.put(readings(500, start=i), source="replay", position=i)
    assert b.position("replay") == i - 500  # the refused batch's position was not committed
    st = b.status()
    assert st["rejected_newest"] == 0 and st["stored"] == i  # refused, not dropped: it is offered again
    drain(b, 1000)  # the forwarder makes room ...
    b.reclaim()
    b.put(readings(500, start=i), source="replay", position=i)  # ... and the same batch goes in
    assert b.position("replay") == i and b.status()["stored"] == i + 500
    b.close()


def test_budget_reject_newest_refuses_and_counts_for_a_source_that_cannot_wait(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="reject_newest", live_window_ms=10**12)
    fill(b, 30_000, can_wait=False)
    st = b.status()
    assert st["rejected_newest"] > 0 and st["evicted_oldest"] == 0
    rows = drain(b, 1000)
    assert rows[0][0] == T0  # the oldest are kept
    assert len(rows) + st["rejected_newest"] == 30_000
    b.close()


def test_budget_reclaims_acknowledged_rows_before_evicting(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="reject_newest", live_window_ms=10**12,
               reclaim_every=10**9)
    for i in range(0, 30_000, 500):
        b.put(readings(500, start=i))
        drain(b, 500)  # the cloud keeps up: nothing should ever be refused
    assert b.status()["rejected_newest"] == 0
    b.close()


def test_status_reports_autonomy(tmp_path):
    clock = [1_700_000_000.0]
    b = Buffer(tmp_path / "b.db", budget_bytes=100 * 2**20, clock=lambda: clock[0], live_window_ms=10**12)
    for i in range(10):
        b.put(readings(100, start=i * 100))
        clock[0] += 60  # 100 readings a minute
    st = b.status()
    assert st["ingest_per_h"] == pytest.approx(6000, rel=0.01)
    assert st["limit_bytes"] == st["budget_bytes"] - 2 * (4 << 20)  # the WAL's share, and the reserve
    expected = (st["limit_bytes"] - st["used_bytes"]) / (6000 * st["bytes_per_reading"])
    assert st["autonomy_hours"] == pytest.approx(expected, rel=0.05)
    assert st["pending"] == 1000 and st["oldest_pending_ts"] == T0
    b.close()


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(BufferError, match=r"^policy: 'drop_newest' is not one of drop_oldest, reject_newest$"):
        Buffer(tmp_path / "b.db", policy="drop_newest")


# ---------------------------------------------------------------- migrations, read-only


def test_migrations_are_recorded(buf):
    rows = buf.db.execute("SELECT version, name FROM migrations ORDER BY version").fetchall()
    assert rows == [(v, n) for v, n, _ in MIGRATIONS]
    assert buf.schema_version == MIGRATIONS[-1][0]


def test_newer_schema_is_refused(db_path):
    Buffer(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO migrations VALUES(99, 'from the future', 0)")
    db.commit()
    db.close()
    known = MIGRATIONS[-1][0]
    with pytest.raises(SchemaError, match=rf"schema version 99 is newer than this gateway knows \({known}\)"):
        Buffer(db_path)


def test_readonly_status_beside_a_writer(db_path):
    w = Buffer(db_path)
    w.put(readings(10))
    r = Buffer(db_path, readonly=True)
    assert r.status()["pending"] == 10
    w.put(readings(5, start=10))
    assert r.pending() == 15
    r.close()
    w.close()


def test_readonly_without_a_buffer_says_so(tmp_path):
    with pytest.raises(BufferError, match=r"no buffer here"):
        Buffer(tmp_path / "missing.db", readonly=True)


# ---------------------------------------------------------------- order, backpressure, failures


def test_a_backfill_next_to_a_live_source_does_not_overtake_the_live_lane(db_path):
    now = [120]
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=lambda: (T0 + now[0] * MIN) / 1000)
    b.put(readings(120))  # an outage left a backlog; the newest ten minutes are live
    first = b.claim(5)
    assert first.lane == "live"
    b.put([reading(112, meter="7")])  # a live meter's late report, below the live lane's frontier
    order = []
    while (c := b.claim(100)) is not None:
        order.append(c.lane)
        b.ack(c)
    b.ack(first)
    assert order[0] == "live" and order.index("resend") < order.index("backlog"), order
    assert b.live is None and b.pending() == 0
    # No live lane now: a live source keeps up, and a backfill of old data arrives beside it.
    b.put([reading(i, meter="9") for i in range(0, 100, 10)])  # below every frontier: late
    now[0] = 122
    b.put(readings(2, start=120))  # live readings
    c = b.claim(100)
    assert c.lane == "backlog" and [r[0] for r in c.rows] == [T0 + 120 * MIN, T0 + 121 * MIN]
    b.ack(c)
    c = b.claim(100)
    assert c.lane == "resend" and len(c.rows) == 10
    b.ack(c)
    assert b.pending() == 0


def test_one_meter_whose_clock_runs_a_day_ahead_does_not_turn_live_first_off(db_path):
    b = Buffer(db_path, live_window_ms=10 * MIN, clock=at(120))
    b.put(readings(120))
    b.put([reading(120 + 23 * 60, meter="skewed")])  # 23 h in the future: accepted
    c = b.claim(100)
    assert c.lane == "live" and {r[0] for r in c.rows} >= {T0 + i * MIN for i in range(111, 120)}


def test_eviction_takes_the_late_readings_it_evicts_with_it(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="drop_oldest", live_window_ms=10**12)
    b.put(readings(100, start=5000))
    drain(b)
    b.put(readings(50, start=0))  # late: listed in resend
    assert b.status()["resend"] == 50
    b.release_all()
    fill(b, 30_000, batch=500)  # the budget evicts the oldest, the late ones among them
    st = b.status()
    assert st["evicted_oldest"] > 0
    rows = drain(b, 1000)
    assert b.pending() == 0 and b.status()["resend"] == 0
    assert len(rows) + st["evicted_oldest"] == st["stored"] - 100  # all delivered or counted
    b.close()


def test_reclaim_goes_past_more_late_readings_than_one_chunk_takes(tmp_path):
    """Under a small budget a reclaim transaction takes 256 rows; 400 undelivered late readings at
    the bottom made each delete take none of them and none above: the reclaim never ended."""
    from gateway.reclaim import chunk_rows

    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="drop_oldest", live_window_ms=10**12)
    assert chunk_rows(b) == 256
    b.put(readings(1000, start=5000))
    drain(b)
    b.put(readings(400, start=0))  # late: listed in resend, below the cursor, not yet delivered
    assert b.status()["resend"] == 400
    assert b.reclaim() == 1000
    assert b.pending() == 400 and len(drain(b)) == 400
    b.close()


def test_a_key_whose_row_was_reclaimed_is_stored_again_as_a_late_reading(buf):
    buf.put([reading(1, value=5.0)])
    drain(buf)
    assert buf.put([reading(1, value=6.0)]).quarantined == 1  # within the reclaim horizon: a conflict
    buf.reclaim()
    assert buf.put([reading(1, value=6.0)]).stored == 1  # reclaimed: the buffer no longer knows the key
    assert [r[2] for r in drain(buf)] == [6.0]


def test_a_put_that_fails_after_evicting_leaves_memory_as_the_database(tmp_path, monkeypatch):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="drop_oldest", live_window_ms=10**12)
    fill(b, 6000)
    before = (b.backlog.cursor, b.backlog.frontier, dict(b.stats), len(b.meters))
    real = b.db
    failing = FailingConnection(real, {"failed": 0, "failed_after_delete": 0})  # the insert finds the disk full
    failing.armed = True
    monkeypatch.setattr(b, "db", failing)
    with pytest.raises(DiskFull, match=r"b\.db: the disk is full \(database or disk is full\)"):
        b.put(readings(500, start=6000, meters=2))  # a new meter too
    monkeypatch.setattr(b, "db", real)
    assert failing.tally == {"failed": 1, "failed_after_delete": 1}  # it failed after evicting
    assert (b.backlog.cursor, b.backlog.frontier, b.stats, len(b.meters)) == before
    rows = drain(b, 1000)
    st = b.status()
    assert len(rows) + st["evicted_oldest"] == 6000 and b.pending() == 0
    assert b.put([reading(1, meter="2")]).stored == 1  # the new meter gets an id of its own
    assert len({(m.building, m.meter) for m in b.meters.values()}) == len(b.meters)
    b.close()


def test_a_put_that_fails_adds_nothing_to_the_ingest_rate(db_path, monkeypatch):
    """The rate that status and autonomy are computed from counted a rolled-back put's rows: on a
    full disk, every retry of one batch raised the ingest rate."""
    now = [T0 / 1000]
    b = Buffer(db_path, live_window_ms=10**12, clock=lambda: now[0])
    b.put(readings(100))
    now[0] += 60
    real = b.db
    failing = DiskFullOn(real, "COMMIT", armed=False, once=True)  # the WAL could not take its last pages
    monkeypatch.setattr(b, "db", failing)
    for _ in range(3):  # the source offers its batch again, and again, on a full disk
        failing.armed = True
        with pytest.raises(DiskFull):
            b.put(readings(100, start=100))
    monkeypatch.setattr(b, "db", real)
    assert b.stats["stored"] == 100
    b.put(readings(100, start=100))
    assert b.status()["ingest_per_h"] == 100 * 60  # 100 readings a minute, as stored
    b.close()


def test_the_counts_a_promise_depends_on_commit_with_the_rows(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=256 * 1024, policy="reject_newest", live_window_ms=10**12)
    fill(b, 30_000, can_wait=False)
    refused = b.stats["rejected_newest"]
    assert refused > 0
    r = Buffer(tmp_path / "b.db", readonly=True)  # as `gateway status` sees it, before any stop
    assert r.status()["rejected_newest"] == refused
    r.close()
    b.close()


def test_the_wal_stays_within_its_share_of_the_budget(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=1 << 20, policy="drop_oldest", live_window_ms=10**12)
    sizes = []
    for i in range(0, 60_000, 1000):
        b.put(readings(1000, start=i))
        sizes.append((tmp_path / "b.db").stat().st_size + (tmp_path / "b.db-wal").stat().st_size)
    assert b.stats["evicted_oldest"] > 0
    assert max(sizes) <= (1 << 20) * 1.05, f"file and WAL reached {max(sizes)} bytes on a 1 MiB budget"
    b.close()


def test_a_file_of_schema_version_1_upgrades_in_order(db_path):
    from gateway.schema import MIGRATIONS as STEPS

    db = sqlite3.connect(db_path)
    db.executescript(
        "CREATE TABLE migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL);"
        + STEPS[0][2]
        + "INSERT INTO migrations VALUES(1, 'initial schema', 0);"
        "INSERT INTO meters VALUES(1, '0', '1', 'electricity');"
        "INSERT INTO sources VALUES(1, 'test', '41');"
        f"INSERT INTO readings VALUES({T0}, 1, 4.5, 1);"
    )
    db.commit()
    db.close()
    b = Buffer(db_path, live_window_ms=10**12)
    assert [v for (v,) in b.db.execute("SELECT version FROM migrations ORDER BY version")] == [1, 2, 3]
    assert b.position("test") == 41
    [row] = drain(b)
    assert row == (T0, 1, 4.5, None, None, None, None)  # stored unscored before version 3
    b.put([reading(2)])
    assert b.pending() == 1
    b.close()


def test_new_readings_above_every_frontier_skip_the_per_row_late_check(buf, monkeypatch):
    """The put shortcut: once something is claimed, a batch newer than every frontier must not pay
    a per-row comparison (a line after the fast path overwrote its lowest ts with MIN_TS_MS)."""
    buf.put(readings(100))
    buf.ack(buf.claim(50))
    calls = []
    monkeypatch.setattr(buf.lanes, "is_late", lambda key: calls.append(key) or False)
    buf.put(readings(100, start=100))
    assert calls == []
    buf.put([reading(10, meter="2")])  # a late reading does take the per-row path
    assert calls == [(T0 + 10 * MIN, 2)]


def test_a_batch_no_budget_could_hold_is_a_clear_error_not_a_wait_forever(tmp_path):
    b = Buffer(tmp_path / "b.db", budget_bytes=1 << 20, policy="reject_newest", live_window_ms=10**12)
    with pytest.raises(BufferError, match=r"^.*b\.db: a batch of 30000 readings is more than a budget of 1048576 "
                                          r"bytes can ever hold; lower the source's batch_size or raise "
                                          r"buffer\.budget_mb$"):
        b.put(readings(30_000))
    assert b.put(readings(2_000)).stored == 2_000  # a batch that fits goes in
    b.close()
