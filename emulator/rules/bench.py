"""How fast the rules engine runs the raw-reading rule: ``gateway bench``'s ``rules_readings_per_s``.

The raw rule of ``cloud/analytics.yaml`` (``SELECT *, topic(5) AS kind, topic() AS topic,
timestamp() AS received_ms FROM 'dt/meters/+/+/raw'``, one Firehose action) runs on messages as
the gateway makes them (:func:`gateway.messages.encode`, 71 to 100 readings each, several
gateways and sites), into a Firehose that only counts its records. What is timed is
:meth:`~emulator.rules.engine.RulesEngine.handle`: parse the payload, match, evaluate, serialize
the output, call the action. The rate over the gateway's drain is the bench's ``rules_ratio``::

    from emulator.rules.bench import measure
    measure(2000)   # readings per second
"""

from __future__ import annotations

import random
import time

__all__ = ["CountingFirehose", "make_messages", "measure", "run"]


class CountingFirehose:
    """A Firehose that counts the records and bytes it is given, and keeps nothing."""

    def __init__(self) -> None:
        self.calls = 0
        self.records = 0
        self.bytes = 0

    def put_record_batch(self, stream_name: str, records: list[bytes]) -> None:
        self.calls += 1
        self.records += len(records)
        self.bytes += sum(len(r) for r in records)


def make_messages(n: int, seed: int = 1) -> list[tuple[str, bytes, int]]:
    """``n`` raw messages ``(topic, payload, readings)`` of 71 to 100 readings each."""
    from gateway.messages import encode

    rnd = random.Random(seed)
    kinds = ("electricity", "chilledwater", "steam", "hotwater")
    out = []
    ts = 1_483_228_800_000
    for i in range(n):
        site, thing = str(i % 16), f"gw-{i % 8}"
        count = rnd.randint(71, 100)
        rows = [[f"{1000 + rnd.randrange(1500)}:{kinds[k % 4]}", ts + k * 3_600_000, round(rnd.uniform(0, 900), 4)]
                for k in range(count)]
        ts += 60_000
        out.append((f"dt/meters/{site}/{thing}/raw", encode(thing, site, rows), count))
    return out


def run(messages: list[tuple[str, bytes, int]], root: str | None = None) -> dict:
    """Handle ``messages`` with the raw rule and a counting Firehose; the figures. With ``root``
    (an emulation root), the real :class:`~emulator.firehose.LocalFirehose` instead, its gzip
    objects written (the time includes its close, which writes what is still buffered)."""
    from emulator.rules.engine import Actions, RulesEngine

    if root is None:
        firehose = counted = CountingFirehose()
    else:
        from emulator.firehose import LocalFirehose

        firehose, counted = LocalFirehose(root, timer=False), None
    engine = RulesEngine(actions=Actions(firehose=firehose), rules=("RawRule",))
    readings = sum(n for _, _, n in messages)
    handle = engine.handle
    start = time.perf_counter()
    for topic, payload, _ in messages:
        handle(topic, payload, None)
    if counted is None:
        firehose.close()
    elapsed = time.perf_counter() - start
    records = counted.records if counted is not None else firehose.records_delivered
    if records != len(messages):
        raise RuntimeError(f"rules bench: {len(messages)} messages gave {records} Firehose records")
    if counted is None:
        return {"messages": len(messages), "readings": readings, "seconds": elapsed,
                "readings_per_s": readings / elapsed if elapsed > 0 else float("inf"), "objects": len(firehose.objects)}
    return {"messages": len(messages), "readings": readings, "seconds": elapsed,
            "readings_per_s": readings / elapsed if elapsed > 0 else float("inf"),
            "firehose_calls": firehose.calls, "firehose_bytes": firehose.bytes}


def measure(n_messages: int = 2000, *, seed: int = 1) -> float:
    """Readings per second through the raw rule and its Firehose action (see the module doc)."""
    return run(make_messages(n_messages, seed))["readings_per_s"]
