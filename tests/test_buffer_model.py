"""A randomized model test of the buffer: whatever the interleaving of puts (in order and late),
claims from both lanes, acknowledgements out of order, releases and crashes, every stored
reading is delivered, and only acknowledged readings are ever removed."""

from __future__ import annotations

import random

import pytest

from gateway.buffer import Buffer
from gateway.readings import Reading

from faults import FailingConnection

T0 = 1_767_225_600_000
MIN = 60_000


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_lose_nothing(tmp_path, seed):
    rng = random.Random(seed)
    meters = rng.choice([1, 3, 10])
    window = rng.choice([2, 5, 30]) * MIN

    def open_buffer():
        # The clock follows the newest tick, so readings are live and lanes open and merge.
        return Buffer(tmp_path / "b.db", live_window_ms=window, reclaim_every=rng.choice([1, 50, 10**9]),
                      clock=lambda: (T0 + tick * MIN) / 1000)

    tick = 0
    b = open_buffer()
    stored: set[tuple[str, int]] = set()
    lanes_opened = 0
    delivered: set[tuple[str, int]] = set()
    inflight = []

    def key(meter_id: int, ts: int) -> tuple[str, int]:
        return (b.meters[meter_id].key, ts)

    for step in range(400):
        op = rng.random()
        if op < 0.35:  # a source stores the next ticks
            n = rng.randint(1, 8)
            batch = [Reading("0", str(m), "electricity", T0 + (tick + i) * MIN, 1.0, "s")
                     for i in range(n) for m in range(meters)]
            tick += n
            b.put(batch)
            stored |= {(r.meter_id, r.ts) for r in batch}
        elif op < 0.40 and tick > 5:  # a late reading of a new meter, in the past
            t = rng.randint(0, tick - 1)
            r = Reading("0", f"late{step}", "electricity", T0 + t * MIN, 1.0, "late")
            b.put([r])
            stored.add((r.meter_id, r.ts))
        elif op < 0.70:
            c = b.claim(rng.choice([1, 3, 7, 20]))
            if c is not None:
                inflight.append(c)
        elif op < 0.90 and inflight:  # a PUBACK, in any order
            c = inflight.pop(rng.randrange(len(inflight)))
            b.ack(c)
            delivered |= {key(r[1], r[0]) for r in c.rows}
        elif op < 0.95:  # a publish failed: everything in flight goes back
            b.release_all()
            inflight.clear()
        else:  # kill -9: claims are lost, the file stays
            lanes_opened += len(b.live_floors)
            b.db.close()
            b = open_buffer()
            inflight.clear()
    # Recovery: drain everything that is left.
    b.db.close()
    b = open_buffer()
    while (c := b.claim(50)) is not None:
        b.ack(c)
        delivered |= {key(r[1], r[0]) for r in c.rows}
    lanes_opened += len(b.live_floors)
    missing = stored - delivered
    assert not missing, f"seed {seed}: {len(missing)} stored readings never delivered, e.g. {sorted(missing)[:5]}"
    assert b.pending() == 0
    b.close()
    LANES[seed] = lanes_opened


LANES: dict[int, int] = {}


def test_the_interleavings_exercised_the_live_lane():
    """The model test above is only worth something if lanes opened and merged in it."""
    assert len(LANES) == 40, "run with the model test"
    assert sum(1 for n in LANES.values() if n) >= 20, LANES


# ---------------------------------------------------------------- at the budget, with failures

def meters_in_db(db) -> dict[int, tuple[str, str, str]]:
    return {mid: (site, building, meter) for mid, site, building, meter in
            db.execute("SELECT id, site, building, meter FROM meters")}


def keys_in_db(db, readings) -> set[tuple[str, int]]:
    """Which of ``readings`` the database holds, by (meter key, ts)."""
    out = set()
    for r in readings:
        row = db.execute(
            "SELECT 1 FROM readings r JOIN meters m ON m.id = r.meter"
            " WHERE m.site = ? AND m.building = ? AND m.meter = ? AND r.ts = ?",
            (r.site, r.building, r.meter, r.ts)).fetchone()
        if row:
            out.add((r.meter_id, r.ts))
    return out


BUDGET: dict[int, tuple[int, int, int, int]] = {}  # seed -> (evicted, refused or held back, failed, failed after a delete)


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_at_the_budget_with_failed_puts_lose_nothing_uncounted(tmp_path, seed):
    """Puts in order and late (resend), claims, acks in any order, releases, crashes, a small
    budget under both policies, and puts that fail inside the transaction after the eviction
    (``database or disk is full`` on the insert). Every reading the buffer stored is delivered
    or counted evicted, never both; a failed put changes nothing, in the database or in memory;
    no two meters share an id; and pending() reaches 0 once everything is acknowledged."""
    rng = random.Random(1000 + seed)
    meters = rng.choice([1, 3, 10])
    window = rng.choice([2, 5, 30]) * MIN
    policy = rng.choice(["drop_oldest", "reject_newest"])
    budget = rng.choice([48, 64, 96]) * 1024
    path = tmp_path / "b.db"
    tick = 0
    tally = {"failed": 0, "failed_after_delete": 0}

    def open_buffer():
        b = Buffer(path, budget_bytes=budget, policy=policy, live_window_ms=window,
                   reclaim_every=rng.choice([1, 50, 10**9]), clock=lambda: (T0 + tick * MIN) / 1000)
        b.db = FailingConnection(b.db, tally)
        return b

    def check_memory_matches_database(b, when: str) -> None:
        ro = Buffer(path, budget_bytes=budget, policy=policy, live_window_ms=window, readonly=True,
                    clock=lambda: (T0 + tick * MIN) / 1000)
        try:
            in_db = meters_in_db(b.db)
            in_memory = {mid: (m.site, m.building, m.meter) for mid, m in b.meters.items()}
            assert in_memory == in_db, f"seed {seed}, {when}: meters in memory {in_memory} != in the database {in_db}"
            assert len(set(in_db.values())) == len(in_db), f"seed {seed}, {when}: two ids for one meter: {in_db}"
            assert b.pending() == ro.pending(), (
                f"seed {seed}, {when}: pending() is {b.pending()} in memory but {ro.pending()} by the database's "
                f"cursors: the lanes moved over readings the rolled-back transaction left in place")
        finally:
            ro.db.close()

    b = open_buffer()
    stored: set[tuple[str, int]] = set()           # what the buffer said it stored
    holes: list[Reading] = []                      # offered, not stored: a source may offer them again later
    delivered: set[tuple[str, int]] = set()
    evicted = refused = 0
    inflight = []

    def key(meter_id: int, ts: int) -> tuple[str, int]:
        return (b.meters[meter_id].key, ts)

    def offer(batch: list[Reading], fail: bool) -> None:
        nonlocal evicted, refused
        before = dict(b.stats)
        b.db.armed = fail
        try:
            res = b.put(batch)
        except Exception as exc:  # a failed put (or BufferFull: the source keeps its batch)
            assert fail or "full" in f"{type(exc).__name__} {exc}".lower(), f"seed {seed}: put raised {exc!r}"
            assert not keys_in_db(b.db, batch), f"seed {seed}: a failed put left some of its readings stored"
            assert {k: b.stats[k] for k in COUNTED} == {k: before[k] for k in COUNTED}, (
                f"seed {seed}: a failed put changed the counters: {before} -> {b.stats}")
            if fail:
                check_memory_matches_database(b, f"after a put failed at step {step}")
            holes.extend(batch)
            return
        finally:
            b.db.armed = False
        assert res.stored + res.duplicates + res.quarantined + res.refused == len(batch), (seed, res, len(batch))
        evicted += res.evicted
        refused += res.refused
        now = {(r.meter_id, r.ts) for r in batch} if res.stored == len(batch) else keys_in_db(b.db, batch)
        assert len(now) == res.stored, (seed, res, len(now))
        stored.update(now)
        holes.extend(r for r in batch if (r.meter_id, r.ts) not in now)

    for step in range(400):
        op = rng.random()
        fail = rng.random() < 0.15
        if op < 0.35:  # a source stores the next ticks
            n = rng.randint(1, 8)
            batch = [Reading("0", str(m), "electricity", T0 + (tick + i) * MIN, 1.0, "s")
                     for i in range(n) for m in range(meters)]
            tick += n
            if rng.random() < 0.1:  # a new meter joins in this batch
                batch.append(Reading("0", f"new{step}", "electricity", T0 + (tick - 1) * MIN, 2.0, "s"))
            offer(batch, fail)
        elif op < 0.42 and tick > 5:  # a late reading: a hole offered again, or a new meter in the past
            if holes and rng.random() < 0.5:
                r = holes.pop(rng.randrange(len(holes)))
            else:
                r = Reading("0", f"late{step}", "electricity", T0 + rng.randint(0, tick - 1) * MIN, 1.0, "late")
            offer([r], fail)
        elif op < 0.70:
            c = b.claim(rng.choice([1, 3, 7, 20]))
            if c is not None:
                inflight.append(c)
        elif op < 0.90 and inflight:  # a PUBACK, in any order
            c = inflight.pop(rng.randrange(len(inflight)))
            b.ack(c)
            delivered |= {key(r[1], r[0]) for r in c.rows}
        elif op < 0.95:  # a publish failed: everything in flight goes back
            b.release_all()
            inflight.clear()
        else:  # kill -9: claims are lost, the file stays
            b.db._db.close()
            b = open_buffer()
            inflight.clear()
        if step % 50 == 49:
            check_memory_matches_database(b, f"step {step}")

    BUDGET[seed] = (evicted, refused + len(holes), tally["failed"], tally["failed_after_delete"])
    # Drain what is left with this very buffer (no reopen: its memory must be right) ...
    for c in inflight:
        b.ack(c)
        delivered |= {key(r[1], r[0]) for r in c.rows}
    while (c := b.claim(50)) is not None:
        b.ack(c)
        delivered |= {key(r[1], r[0]) for r in c.rows}
    assert b.pending() == 0, f"seed {seed}: nothing left to claim, but pending() is {b.pending()}"
    # ... and a restart finds nothing more to send.
    b.db._db.close()
    b = open_buffer()
    late = []
    while (c := b.claim(50)) is not None:
        b.ack(c)
        late += [key(r[1], r[0]) for r in c.rows]
    assert not late, (f"seed {seed}: {len(late)} readings came out only after a restart (the buffer's memory "
                      f"had lost them), e.g. {late[:5]}")
    assert b.pending() == 0

    assert delivered <= stored, f"seed {seed}: delivered readings never stored: {sorted(delivered - stored)[:5]}"
    assert b.stats["evicted_oldest"] == evicted and b.stats["rejected_newest"] == refused, (seed, b.stats)
    gap = len(stored) - len(delivered) - evicted
    assert gap == 0, (
        f"seed {seed} ({policy}, budget {budget}): stored {len(stored)} != delivered {len(delivered)} + evicted "
        f"{evicted}: " + (f"{gap} readings neither delivered nor counted evicted" if gap > 0 else
                          f"{-gap} readings both delivered and counted evicted (acknowledged, then evicted: "
                          f"a claim acknowledged out of order, handed back by release_all or a restart, then evicted)"))
    if policy == "reject_newest":
        assert evicted == 0 and len(stored) == len(delivered)
    b.close()


COUNTED = ("received", "stored", "duplicates", "quarantined", "evicted_oldest", "rejected_newest", "delivered")


def test_the_budget_runs_reached_the_budget_and_failed_after_evicting():
    """The model test above is only worth something if it evicted, refused, and failed puts
    after an eviction had run inside them."""
    assert len(BUDGET) == 40, "run with the model test at the budget"
    assert sum(1 for e, *_ in BUDGET.values() if e) >= 10, BUDGET
    assert sum(1 for _, r, *_ in BUDGET.values() if r) >= 10, BUDGET
    assert sum(v[3] for v in BUDGET.values()) >= 20, BUDGET
