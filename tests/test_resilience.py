"""End to end against a real mosquitto: kill -9 crashes, an uplink outage with publishes in
flight, the bundled sample.

These drive the real ``gateway run`` (a subprocess, for the crash test) or the real
:class:`~gateway.runner.Gateway` with the real MQTT5 publisher, and count what arrived at the
broker against what the source produced.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from gateway.config import validate
from gateway.messages import decode
from gateway.publishers.mqtt import MqttPublisher
from gateway.runner import Gateway
from gateway.sources.replay import ReplaySource
from gateway.sources.simulator import SimulatorSource

from conftest import THING, publisher_for

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
START = "2026-01-01T00:00:00Z"
START_MS = 1_767_225_600_000


def keys_of(messages) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for m in messages for r in decode(m.payload)["readings"]]


class Received:
    """Keys received so far, updated incrementally: a wait_for predicate runs under the
    subscriber's lock on every message, so it must cost O(new messages), not O(all)."""

    def __init__(self):
        self.seen = 0
        self.keys: set[tuple[str, int]] = set()
        self.total = 0
        self.missing: set[tuple[str, int]] | None = None

    def update(self, messages) -> "Received":
        for m in messages[self.seen:]:
            for r in decode(m.payload)["readings"]:
                k = (r[0], r[1])
                self.keys.add(k)
                self.total += 1
                if self.missing is not None:
                    self.missing.discard(k)
        self.seen = len(messages)
        return self

    def at_least(self, n: int):
        return lambda msgs: self.update(msgs).total >= n

    def covers(self, expected: set):
        self.missing = set(expected) - self.keys
        return lambda msgs: not self.update(msgs).missing


def write_config(tmp_path: Path, broker, certs, sources: list[dict], **extra) -> Path:
    client = certs.client(THING)
    conf = {
        "thing": THING,
        "buffer": {"path": str(tmp_path / "buffer.db"), **extra.pop("buffer", {})},
        "sources": sources,
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
        "forwarder": {"window": 16, "claim_size": 500, "backoff_min_s": 0.05, "backoff_max_s": 0.5,
                      **extra.pop("forwarder", {})},
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def expected_simulator_keys(meters: int, ticks: int, start_ms: int = START_MS) -> set[tuple[str, int]]:
    src = SimulatorSource("sim", meters=meters, seed=3, start_ms=start_ms, speed=None, count=ticks)
    return {(r.meter_id, r.ts) for b in src.batches(None, threading.Event()) for r in b.readings}


def test_kill_dash_nine_loses_nothing(tmp_path, broker, certs, subscriber):
    """kill -9 a real `gateway run` at random moments; then every reading arrives, and
    duplicates stay within what was in flight at each kill."""
    meters, ticks = 100, 400  # 40,000 readings at 10,000 a second of wall time
    config = write_config(tmp_path, broker, certs, [{
        "type": "simulator", "name": "sim", "meters": meters, "seed": 3, "start": START,
        "speed": 6000.0, "count": ticks,
    }])
    expected = expected_simulator_keys(meters, ticks)
    rng = random.Random(20261129)
    cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    got = Received()
    log = open(tmp_path / "gateway.log", "ab")
    for threshold in sorted(rng.sample(range(2_000, 36_000), 4)):
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
        reached = subscriber.wait_for(got.at_least(threshold), timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert reached, f"stalled before {threshold} readings: {(tmp_path / 'gateway.log').read_text()[-2000:]}"
        kills += 1
    final = subprocess.run(cmd + ["--exit-when-idle"], stdout=log, stderr=log, env=env, cwd=REPO, timeout=120)
    assert final.returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    if not subscriber.wait_for(got.covers(expected), timeout=30):
        lost = sorted(expected - set(keys_of(subscriber.snapshot())), key=lambda k: k[1])
        ticks_lost = sorted({ts for _, ts in lost})
        raise AssertionError(
            f"lost {len(lost)} readings in {len(ticks_lost)} ticks "
            f"{[(t - START_MS) // 60000 for t in ticks_lost][:50]}; log:\n"
            + (tmp_path / "gateway.log").read_text()[-4000:] + "\nbroker log:\n" + broker.log()[-3000:])
    received = keys_of(subscriber.snapshot())
    assert set(received) == expected  # nothing lost, nothing invented
    assert "dropped" not in broker.log()  # and the broker dropped nothing on the way
    duplicates = len(received) - len(set(received))
    in_flight_bound = 16 * 100 + 500  # window × readings per message + one claim
    assert duplicates <= kills * in_flight_bound, f"{duplicates} duplicates after {kills} kills"


def test_kill_dash_nine_with_scoring_and_a_live_lane_sends_the_same_scores_every_time(
        tmp_path, broker, link, certs, subscriber):
    """kill -9 a real, scoring `gateway run` while a live lane is open ahead of a backlog.

    The fleet starts an hour before the wall clock and runs faster than it, so its newest
    readings become live while the uplink is cut and a backlog builds; after the link comes
    back the buffer sends live readings first while the source keeps producing. Across five
    kills, every (meter, ts) that arrives
    more than once carries the same value, expected, score and flag every time, every message
    id sent twice has the same bytes, and nothing is lost.
    """
    from gateway.buffer import Buffer

    meters, ticks, window_s = 100, 140, 600
    start_ms = (int(time.time()) // 60 - 60) * 60_000  # an hour ago, on the minute
    start = datetime.fromtimestamp(start_ms / 1000, timezone.utc).isoformat()
    client = certs.client(THING)
    db = tmp_path / "buffer.db"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "thing": THING,
        "buffer": {"path": str(db), "live_window_s": window_s},
        "sources": [{"type": "simulator", "name": "sim", "meters": meters, "seed": 3, "start": start,
                     "speed": 120.0, "count": ticks, "anomaly_rate": 0.01}],  # 2 minutes of data a second
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": link.port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
        "model": {"path": str(REPO / "models" / "ashrae-lgbm"),
                  "buildings": str(REPO / "data" / "building_metadata.csv")},
        "forwarder": {"window": 16, "claim_size": 500, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
    }))
    expected = expected_simulator_keys(meters, ticks, start_ms)
    rng = random.Random(20261201)
    cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "gateway.log"
    log = open(log_path, "ab")
    got = Received()
    saw_live = []

    def peek() -> dict | None:
        try:
            b = Buffer(db, readonly=True)
        except Exception:
            return None
        try:
            st = b.status()
            if st["live_lane"]:
                saw_live.append(st)
            return st
        except Exception:  # read beside a writer that was just killed: try again later
            return None
        finally:
            b.db.close()

    def wait_until(predicate, timeout: float) -> bool:
        deadline, pause = time.monotonic() + timeout, threading.Event()
        while not predicate():
            if time.monotonic() > deadline:
                return False
            pause.wait(0.2)
        return True

    def live_by_now() -> int:
        """Readings stored once the fleet's data is inside the live window of the wall clock."""
        return meters * min(ticks, (int(time.time() * 1000) - window_s * 500 - start_ms) // 60_000)

    def kill(proc) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    link.cut()  # the uplink is down from the start: a backlog builds while the data catches up
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    first = rng.randint(1_000, 4_000)
    ok = wait_until(lambda: (s := peek()) is not None and s["pending"] >= first, timeout=90)
    kill(proc)
    assert ok, f"stored fewer than {first} readings: {peek()}; log:\n{log_path.read_text()[-3000:]}"

    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    ok = wait_until(lambda: (s := peek()) is not None and s["pending"] >= live_by_now(), timeout=120)
    if not ok:
        kill(proc)
    assert ok, f"the data never caught up with the clock: {peek()}; log:\n{log_path.read_text()[-3000:]}"
    link.restore()  # an hour of backlog, and live readings arriving: the live lane opens
    # The kill as the link comes back also spares the wait for the client's reconnect backoff.
    kill(proc)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    for threshold in sorted(rng.sample(range(1_000, 16_000), 3)):  # raw and scored readings
        reached = subscriber.wait_for(got.at_least(threshold), timeout=90)
        peek()
        kill(proc)
        assert reached, f"stalled before {threshold} readings: {log_path.read_text()[-3000:]}"
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    kill(proc)
    final = subprocess.run(cmd + ["--exit-when-idle"], stdout=log, stderr=log, env=env, cwd=REPO, timeout=180)
    assert final.returncode == 0, log_path.read_text()[-3000:]
    assert saw_live, "no live lane was open at any kill: the test did not exercise one"

    messages = subscriber.snapshot()
    raw_keys = {(r[0], r[1]) for m in messages if m.topic.endswith("/raw") for r in decode(m.payload)["readings"]}
    assert raw_keys == expected, f"lost {len(expected - raw_keys)}, invented {len(raw_keys - expected)}"
    # Every message id, raw or scored, stands for the same bytes every time it is sent.
    by_batch: dict[str, bytes] = {}
    changed_batches = []
    for m in messages:
        batch = decode(m.payload)["batch"]
        if by_batch.setdefault(batch, m.payload) != m.payload:
            changed_batches.append((m.topic, batch))
    # Every (meter, ts) carries the same value, and the same expected, score and flag, every time.
    values: dict[tuple[str, int], float] = {}
    scores: dict[tuple[str, int], tuple] = {}
    changed_values, changed_scores, sends = [], [], {}
    for m in messages:
        body = decode(m.payload)
        for r in body["readings"]:
            k = (r[0], r[1])
            if m.topic.endswith("/raw"):
                if values.setdefault(k, r[2]) != r[2]:
                    changed_values.append((k, values[k], r[2]))
            else:
                sends[k] = sends.get(k, 0) + 1
                s = (r[2], r[3], r[4], r[5], body.get("model"))
                if scores.setdefault(k, s) != s:
                    changed_scores.append((k, scores[k], s))
    assert set(scores) == expected, f"{len(expected - set(scores))} readings never scored"
    twice = sum(1 for n in sends.values() if n > 1)
    assert twice, "no scored reading was sent twice: the kills never caught anything in flight"
    assert not changed_values, f"{len(changed_values)} readings changed value between sends, e.g. {changed_values[:3]}"
    assert not changed_scores, (
        f"{len({k for k, *_ in changed_scores})} of the {twice} scored readings sent more than once carried another "
        f"(value, expected, score, flag, model) the next time, e.g. {changed_scores[:3]}")
    assert not changed_batches, f"{len(changed_batches)} message ids were sent with other bytes, e.g. {changed_batches[:3]}"


class WatchedPublisher:
    """The real publisher, counting the publishes still without an outcome, so the test can
    wait (on a condition) until a window of them is in flight."""

    def __init__(self, inner):
        self.inner = inner
        self.local = inner.local
        self._cond = threading.Condition()
        self._pending: set = set()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def publish(self, topic, payload, qos=1):
        fut = self.inner.publish(topic, payload, qos)
        with self._cond:
            self._pending.add(fut)
            self._cond.notify_all()
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut) -> None:
        with self._cond:
            self._pending.discard(fut)
            self._cond.notify_all()

    def wait_in_flight(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._pending) >= n, timeout)

    def close(self):
        self.inner.close()


def test_uplink_outage_with_publishes_in_flight_delivers_everything_live_first_then_backlog_in_order(
        tmp_path, broker, link, certs, subscriber):
    """The gateway reaches mosquitto through a relay (conftest's Link) that the test cuts while a
    full window of publishes waits for PUBACKs, and restores once a backlog has built; the
    subscriber stays connected to mosquitto itself."""
    meters, ticks = 50, 300  # 15,000 readings; 20 ticks (minutes of data) a second of wall time
    # Live means recent by the wall clock: the fleet starts two hours ago and passes the live
    # window's floor (10 minutes ago) during the outage, so a backlog below it waits at the end.
    start_ms = int(time.time() // 60 * 60_000) - 120 * 60_000
    start = datetime.fromtimestamp(start_ms / 1000, timezone.utc).isoformat()
    config = validate(yaml.safe_load(write_config(
        tmp_path, broker, certs,
        [{"type": "simulator", "name": "sim", "meters": meters, "seed": 3, "start": start,
          "speed": 1200.0, "count": ticks}],
        buffer={"live_window_s": 600}, forwarder={"claim_size": 100},
    ).read_text()), base=tmp_path)
    pub = WatchedPublisher(publisher_for(link, certs).start())
    c = certs.client(THING)
    marker = MqttPublisher("localhost", "outage-marker", c.cert, c.key, certs.ca, port=broker.port, local=True)
    gw = Gateway(config, publisher=pub).start()
    got = Received()
    try:
        assert subscriber.wait_for(got.at_least(2_000), timeout=30)
        broker.pause()  # PUBACKs stop: the window fills with publishes in flight
        try:
            assert pub.wait_in_flight(16, timeout=30)
            in_flight_at_cut = gw.forwarder.messages_in_flight
            link.cut()
        finally:
            broker.resume()
        assert pub.inner.wait_disconnected(30)
        # Whatever mosquitto read before the cut reaches the subscriber ahead of a marker sent after it.
        marker.start()
        assert marker.wait_connected(30)
        assert marker.publish("dt/marker", b'{"readings": []}').result(30) is None
        assert subscriber.wait_for(lambda msgs: any(m.topic == "dt/marker" for m in msgs), timeout=30)
        before = len(subscriber.snapshot())
        delivered_before = set(keys_of(subscriber.snapshot()))
        # The outage lasts until 100 ticks are waiting: from about 80 minutes ago (where the cut
        # came) to 20 minutes ahead, seven times the live window below its floor.
        stored = threading.Condition()

        def notify():
            with stored:
                stored.notify_all()

        gw.buffer.add_listener(notify)
        with stored:
            assert stored.wait_for(lambda: gw.buffer.pending() >= 100 * meters, timeout=60)
        assert not pub.connected and link.connections >= 1
        floors_before = len(gw.buffer.live_floors)
        link.restore()
        assert gw.wait(until_idle=True, timeout=120), gw.status()
        assert gw.dead() == {}
    finally:
        gw.stop()
        marker.close()
    assert in_flight_at_cut >= 16
    expected = expected_simulator_keys(meters, ticks, start_ms)
    assert subscriber.wait_for(got.covers(expected), timeout=30)
    received = keys_of(subscriber.snapshot())
    assert set(received) == expected
    assert len(received) - len(set(received)) <= in_flight_at_cut * 100  # duplicates: at most what was in flight

    # Order after the outage: the first messages are live readings (inside the live window,
    # above the floor the buffer chose), and the backlog below the floor arrives in time order.
    assert len(gw.buffer.live_floors) > floors_before, "no live lane was opened after the outage"
    floor_ts = gw.buffer.live_floors[floors_before][0]
    after = [(m.topic, r[0], r[1]) for m in subscriber.snapshot()[before:] for r in decode(m.payload)["readings"]]
    after = [(t, meter, ts) for t, meter, ts in after if (meter, ts) not in delivered_before]
    assert after[0][2] > floor_ts, "the first reading after the outage is not a live one"
    backlog: dict[str, list[int]] = {}
    for t, _, ts in after:
        if ts <= floor_ts:
            backlog.setdefault(t, []).append(ts)
    assert sum(map(len, backlog.values())) >= 30 * meters, "the outage left no backlog"
    for t, seq in backlog.items():  # a claim is one message per site: order holds per site topic
        assert seq == sorted(seq), f"the backlog on {t} did not arrive in time order"


def test_run_on_the_bundled_sample_delivers_every_valid_reading(tmp_path, broker, certs, subscriber):
    config = write_config(tmp_path, broker, certs, [{"type": "replay", "name": "sample", "path": str(SAMPLE)}])
    expected = set()
    rejected = 0
    for batch in ReplaySource("sample", SAMPLE).batches(None, threading.Event()):
        expected |= {(r.meter_id, r.ts) for r in batch.readings}
        rejected += len(batch.rejected)
    assert rejected == 1 and len(expected) == 11_133
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(config), "--exit-when-idle"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert subscriber.wait_for(Received().covers(expected), timeout=30)
    assert set(keys_of(subscriber.snapshot())) == expected
    assert "11133 stored, 11133 delivered, 1 quarantined" in out.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_stop_cleanly_with_nothing_lost(tmp_path, broker, certs, subscriber, sig):
    """A clean stop collects the PUBACKs in flight: after a restart everything arrives once."""
    meters, ticks = 100, 200
    config = write_config(tmp_path, broker, certs, [{
        "type": "simulator", "name": "sim", "meters": meters, "seed": 3, "start": START,
        "speed": 3000.0, "count": ticks,
    }])
    expected = expected_simulator_keys(meters, ticks)
    cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)]
    got = Received()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert subscriber.wait_for(got.at_least(5_000), timeout=60)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("stopped: ")
    stored, delivered = (int(x.split()[0]) for x in out.removeprefix("stopped: ").split(", ")[:2])
    assert 0 < delivered <= stored < len(expected)  # stopped mid-run; the rest waits on disk
    final = subprocess.run(cmd + ["--exit-when-idle"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert final.returncode == 0, final.stderr
    assert subscriber.wait_for(got.covers(expected), timeout=30)
    received = keys_of(subscriber.snapshot())
    assert set(received) == expected
    assert len(received) == len(expected)  # a clean stop leaves nothing to send twice
