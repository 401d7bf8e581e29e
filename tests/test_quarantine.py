"""The quarantine has a way back: `gateway quarantine replay` re-queues what now passes."""

from __future__ import annotations

from click.testing import CliRunner

from gateway.buffer import Buffer
from gateway.cli import main
from gateway.messages import encode
from gateway.readings import Reading

T0 = 1_451_606_400_000
MIN = 60_000
DAY = 24 * 3600 * 1000


def test_a_message_quarantined_by_the_forwarder_goes_back_into_the_buffer(tmp_path):
    b = Buffer(tmp_path / "b.db", live_window_ms=10**12, clock=lambda: T0 / 1000)
    payload = encode("gw-1", "15", [["1433:electricity", T0, 41.5], ["1433:steam", T0, 3.25]])
    b.quarantine_message("topic 'dt/meters/15/gw 1/raw' is refused", payload, "dt/meters/15/gw 1/raw", 2)
    assert b.stats["undeliverable"] == 1
    out = b.replay_quarantine()
    assert out == {"entries": 1, "readings": 2, "kept": 0, "reasons": {}}
    assert b.quarantined() == [] and b.stats["undeliverable"] == 0 and b.stats["requeued"] == 2
    c = b.claim()
    assert sorted((b.meters[r[1]].key, r[0], r[2]) for r in c.rows) == [
        ("1433:electricity", T0, 41.5), ("1433:steam", T0, 3.25)]
    b.close()


def test_a_reading_that_now_passes_is_stored_and_one_that_still_fails_stays(tmp_path):
    now = [T0]
    b = Buffer(tmp_path / "b.db", live_window_ms=10**12, clock=lambda: now[0] / 1000)
    ahead = Reading("0", "1", "electricity", T0 + 2 * DAY, 5.0, "meter")  # its clock ran ahead
    negative = Reading("0", "1", "electricity", T0, -1.0, "meter")
    assert b.put([ahead, negative]).quarantined == 2
    now[0] = T0 + 2 * DAY  # the meter's clock was right after all
    out = b.replay_quarantine(kind="reading")
    assert out["entries"] == 1 and out["readings"] == 1 and out["kept"] == 1
    [kept] = b.quarantined()
    assert out["reasons"] == {kept["id"]: "value: -1.0 is negative"}
    assert b.pending() == 1 and b.stats["quarantined"] == 1
    b.close()


def test_the_replay_command_says_what_it_did(tmp_path):
    b = Buffer(tmp_path / "b.db", live_window_ms=10**12)
    payload = encode("gw-1", "15", [["1433:electricity", T0, 41.5]])
    b.quarantine_message("payload is 140000 bytes, more than IoT Core's 131072", payload, "dt/meters/15/gw-1/raw", 1)
    b.put([Reading("0", "1", "electricity", T0, float("nan"), "meter")])
    b.close()
    result = CliRunner().invoke(main, ["quarantine", "replay", "--db", str(tmp_path / "b.db")])
    assert result.exit_code == 0, result.output
    [nan_id] = [e["id"] for e in Buffer(tmp_path / "b.db", readonly=True).quarantined()]
    assert result.output == (f"re-queued 1 entries (1 readings); 1 kept\n"
                             f"  kept #{nan_id}: value: nan is not finite\n")
    listed = CliRunner().invoke(main, ["quarantine", "--db", str(tmp_path / "b.db")])
    assert listed.exit_code == 0 and "value: nan is not finite" in listed.output


def test_the_quarantine_keeps_to_its_share_of_the_budget_and_counts_what_it_drops(tmp_path):
    from gateway.readings import Rejected

    b = Buffer(tmp_path / "b.db", budget_bytes=1 << 20, policy="drop_oldest", live_window_ms=10**12)
    flood = [Rejected("columns: 1 instead of 19", "x" * 1000, "replay", f"flood.csv:{i}") for i in range(2000)]
    for i in range(0, len(flood), 100):
        b.put([Reading("0", "1", "electricity", T0 + i * MIN, 1.0, "meter")], flood[i : i + 100])
    share = b.budget.limit // 8
    total = b.db.execute("SELECT sum(length(reason) + length(raw) + length(source) + length(location) + 32)"
                         " FROM quarantine").fetchone()[0]
    assert total <= share
    st = b.status()
    assert st["quarantine_dropped"] > 0 and st["quarantine"] + st["quarantine_dropped"] == 2000
    assert st["quarantined"] == 2000 and st["stored"] == 20  # the readings were never crowded out
    b.close()
