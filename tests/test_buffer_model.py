"""A randomized model test of the buffer: whatever the interleaving of puts (in order and late),
claims from both lanes, acknowledgements out of order, releases and crashes, every stored
reading is delivered, and only acknowledged readings are ever removed."""

from __future__ import annotations

import random

import pytest

from gateway.buffer import Buffer
from gateway.readings import Reading

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
