"""The runner's wiring, in process, with the in-memory twins of both seams; the stages'
health and retry policy; the ``gateway run`` exit code and the status display."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future

import yaml
from click.testing import CliRunner

from gateway import cli
from gateway.buffer import Buffer
from gateway.config import validate
from gateway.errors import BufferFull, NotAuthorizedError
from gateway.forwarder import Backoff
from gateway.messages import decode
from gateway.publishers import MemoryPublisher
from gateway.readings import Reading
from gateway.runner import Gateway
from gateway.sources import ListSource

from conftest import THING

T0 = 1_767_225_600_000
MIN = 60_000


def config(tmp_path):
    return validate({"thing": "gw-1", "buffer": {"path": str(tmp_path / "buffer.db")},
                     "sources": [{"type": "simulator", "name": "unused", "count": 1}],
                     "publisher": {"type": "memory"}}, base=tmp_path)


def readings(n, building="7"):
    return [Reading("3", building, "steam", T0 + i * MIN, float(i), "list") for i in range(n)]


def test_sources_buffer_forwarder_wired_and_positions_kept(tmp_path):
    pub = MemoryPublisher()
    gw = Gateway(config(tmp_path), publisher=pub, sources=[ListSource("list", readings(250), size=100)]).start()
    assert gw.wait(until_idle=True, timeout=30)
    gw.stop()
    got = [tuple(r[:2]) for m in pub.messages for r in decode(m.payload)["readings"]]
    assert sorted(got) == [("7:steam", T0 + i * MIN) for i in range(250)]
    assert all(m.topic == "dt/meters/3/gw-1/raw" for m in pub.messages)

    # A restart resumes the source after its last stored batch: nothing is read twice.
    pub2 = MemoryPublisher()
    gw = Gateway(config(tmp_path), publisher=pub2, sources=[ListSource("list", readings(300), size=100)]).start()
    assert gw.wait(until_idle=True, timeout=30)
    gw.stop()
    again = [r[1] for m in pub2.messages for r in decode(m.payload)["readings"]]
    assert sorted(again) == [T0 + i * MIN for i in range(250, 300)]


class Flaky:
    """A source whose device fails ``failures`` times (OSError, as a serial port that vanished)
    before it works; after each failure it is asked again from its committed position."""

    name = "flaky"

    def __init__(self, n: int, failures: int, exc: BaseException = OSError("serial port vanished")):
        self.inner = ListSource("flaky", readings(n, building="8"), size=10)
        self.failures = failures
        self.exc = exc
        self.positions: list = []

    def batches(self, position, stop: threading.Event):
        self.positions.append(position)
        for batch in self.inner.batches(position, stop):
            yield batch
            if self.failures:
                self.failures -= 1
                raise self.exc


def fast(tmp_path, sources, **kw):
    """A gateway on the in-memory publisher whose stages retry within milliseconds."""
    kw.setdefault("dead_after_s", 5.0)
    return Gateway(config(tmp_path), publisher=kw.pop("publisher", MemoryPublisher()), sources=sources,
                   stage_backoff=lambda: Backoff(0.001, 0.01), **kw)


def test_a_transient_source_error_is_retried_from_the_committed_position(tmp_path):
    flaky = Flaky(40, failures=2)
    gw = fast(tmp_path, [flaky, ListSource("list", readings(40), size=10)]).start()
    assert gw.wait(until_idle=True, timeout=30)
    stages = gw.health.snapshot()
    gw.stop()
    assert flaky.positions == [None, 10, 20]  # each retry resumes after the last stored batch
    got = sorted((r[0], r[1]) for m in gw.publisher.messages for r in decode(m.payload)["readings"])
    assert got == sorted({(f"{b}:steam", T0 + i * MIN) for b in "78" for i in range(40)})
    assert stages["source flaky"]["state"] == "finished" and stages["source flaky"]["retries"] == 2
    assert gw.dead() == {}


def test_a_source_that_cannot_continue_is_dead_and_ends_the_wait(tmp_path):
    pub = MemoryPublisher()
    gw = fast(tmp_path, [Flaky(40, failures=1, exc=ValueError("bad frame")), ListSource("list", readings(5))],
              publisher=pub).start()
    assert gw.wait(timeout=30)  # no until_idle: only a dead stage ends this wait
    assert gw.dead() == {"source flaky": "ValueError: bad frame"}
    status = gw.status()
    gw.stop()
    assert status["stages"]["source flaky"]["state"] == "dead"
    saved = Buffer(tmp_path / "buffer.db", readonly=True)
    try:  # what `gateway status` reads, from another process
        health = saved.health()
    finally:
        saved.close()
    assert health["stages"]["source flaky"] == {**status["stages"]["source flaky"], "state": "dead"}
    assert health["stages"]["forwarder"]["state"] == "stopped"


class Unplugged:
    """A source whose device never answers."""

    name = "unplugged"

    def batches(self, position, stop: threading.Event):
        raise OSError("serial port vanished")
        yield  # a generator, like every source


def test_transient_errors_that_last_are_dead_after_dead_after_s(tmp_path):
    gw = fast(tmp_path, [Unplugged()], dead_after_s=0.2).start()
    assert gw.wait(timeout=30)
    stages = gw.health.snapshot()
    gw.stop()
    assert gw.dead() == {"source unplugged": "OSError: serial port vanished"}
    assert stages["source unplugged"]["retries"] >= 3


def test_a_full_buffer_makes_a_source_wait_never_die(tmp_path):
    source = ListSource("list", readings(40), size=10)
    gw = fast(tmp_path, [source], dead_after_s=0)  # any other error would be dead at its second try
    real_put = gw.buffer.put
    full = [5]

    def put(*args, **kwargs):
        if full[0]:
            full[0] -= 1
            raise BufferFull("the byte budget is used and the policy is reject_newest")
        return real_put(*args, **kwargs)

    gw.buffer.put = put
    gw.start()
    assert gw.wait(until_idle=True, timeout=30)
    stages = gw.health.snapshot()
    gw.stop()
    assert gw.dead() == {}
    assert stages["source list"]["state"] == "finished" and stages["source list"]["retries"] == 5
    assert gw.buffer.stats["stored"] == 40


def test_the_forwarder_retries_a_locked_buffer_and_dies_of_a_bug(tmp_path):
    gw = fast(tmp_path, [ListSource("list", readings(300), size=100)])
    real_claim = gw.buffer.claim
    locked = [3]

    def claim(limit=1000):
        if locked[0]:
            locked[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real_claim(limit)

    gw.buffer.claim = claim
    gw.start()
    assert gw.wait(until_idle=True, timeout=30)
    assert gw.health.snapshot()["forwarder"]["retries"] == 3
    assert gw.health.snapshot()["forwarder"]["state"] == "running"
    assert sum(decode(m.payload)["n"] for m in gw.publisher.messages) == 300

    def broken(limit=1000):
        raise ValueError("Out of range float values are not JSON compliant: nan")

    gw.buffer.claim = broken
    gw.buffer.put(readings(1, building="9"))
    assert gw.wait(timeout=30)
    gw.stop()
    assert gw.dead() == {"forwarder": "ValueError: Out of range float values are not JSON compliant: nan"}


class Refusing(MemoryPublisher):
    """Answers NOT_AUTHORIZED to every publish while ``refuse`` is set."""

    def __init__(self):
        super().__init__()
        self.refuse = True

    def publish(self, topic, payload, qos=1):
        if self.refuse:
            f: Future = Future()
            f.set_exception(NotAuthorizedError(f"PUBACK NOT_AUTHORIZED (135) for {topic!r}"))
            return f
        return super().publish(topic, payload, qos)


def test_a_refused_topic_shows_as_blocked_until_the_policy_is_fixed(tmp_path):
    pub = Refusing()
    gw = fast(tmp_path, [ListSource("list", readings(30), size=10)], publisher=pub, auth_retry_s=0.05,
              basic_ingest_rule="meters_ingest").start()
    try:
        reason = "PUBACK NOT_AUTHORIZED (135) for '$aws/rules/meters_ingest/dt/meters/3/gw-1/raw'"
        assert _wait_for(gw, lambda: gw.health.snapshot()["forwarder"]["state"] == "blocked")
        assert gw.health.snapshot()["forwarder"]["error"] == reason
        assert gw.dead() == {} and gw.buffer.stats["delivered"] == 0
        pub.refuse = False
        assert gw.wait(until_idle=True, timeout=30)
        forwarder = gw.health.snapshot()["forwarder"]
        assert (forwarder["state"], forwarder["error"]) == ("running", None)
    finally:
        gw.stop()
    assert gw.buffer.stats["delivered"] == 30 and gw.buffer.stats["undeliverable"] == 0
    assert {m.topic for m in pub.messages} == {"$aws/rules/meters_ingest/dt/meters/3/gw-1/raw"}


def _wait_for(gw, predicate, timeout=30.0) -> bool:
    """Wait on the gateway's health changes until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        gw.health.changed.wait(left)
        gw.health.changed.clear()
    return True


def test_the_clients_ack_timeout_comes_from_the_config_and_the_forwarders_is_longer(tmp_path, broker, certs):
    c = certs.client(THING)
    conf = validate({"thing": THING, "buffer": {"path": str(tmp_path / "buffer.db")},
                     "sources": [{"type": "simulator", "name": "sim", "count": 1, "meters": 1}],
                     "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port, "cert": str(c.cert),
                                   "key": str(c.key), "ca": str(certs.ca), "local": True},
                     "forwarder": {"ack_timeout_s": 12, "window": 16}}, base=tmp_path)
    gw = Gateway(conf)
    try:
        assert gw.publisher.client_options.ack_timeout_sec == 12
        assert gw.forwarder.claim_timeout_s == 12 + 16 * 0.25
    finally:
        gw.stop()


# -- the command line ---------------------------------------------------------------------------


def _write(tmp_path, **extra):
    conf = {"thing": THING, "buffer": {"path": str(tmp_path / "buffer.db")},
            "sources": [{"type": "simulator", "name": "sim", "count": 1, "meters": 3}],
            "publisher": {"type": "memory"}, **extra}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_gateway_run_exits_1_when_a_stage_is_dead(tmp_path, monkeypatch):
    import gateway.runner as runner

    monkeypatch.setattr(runner, "build_source", lambda spec: Flaky(40, failures=1, exc=ValueError("bad frame")))
    result = CliRunner().invoke(cli.main, ["run", "--config", str(_write(tmp_path))])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == "error: source flaky is dead: ValueError: bad frame"


def test_gateway_status_shows_each_stage(tmp_path):
    path = _write(tmp_path)
    buf = Buffer(tmp_path / "buffer.db")
    buf.save_health({"updated": 1_767_225_600_000, "stages": {
        "forwarder": {"state": "blocked", "error": "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/gw/raw'",
                      "since": 1_767_225_600_000, "retries": 0},
        "source sim": {"state": "dead", "error": "ValueError: bad frame", "since": 1_767_225_660_000, "retries": 4},
    }})
    buf.close()
    as_json = CliRunner().invoke(cli.main, ["status", "--config", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["health"]["stages"]["source sim"]["state"] == "dead"
    table = CliRunner(env={"COLUMNS": "200"}).invoke(cli.main, ["status", "--config", str(path)])
    assert table.exit_code == 0, table.output
    lines = [" ".join(line.replace("│", " ").split()) for line in table.output.splitlines()]
    assert ("stage forwarder blocked since 2026-01-01 00:00:00Z: "
            "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/gw/raw'") in lines
    assert "stage source sim dead since 2026-01-01 00:01:00Z after 4 retries: ValueError: bad frame" in lines


def test_model_train_without_the_train_extra_is_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # `import lightgbm` raises ImportError
    result = CliRunner().invoke(cli.main, ["model", "train", "--data", __file__, "--out", "/nonexistent/out"])
    assert result.exit_code == 2
    assert result.stderr == ("error: gateway model train needs the train extra (lightgbm is missing): "
                             "pip install 'meter-gateway[train]'\n")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_source_that_cannot_wait_has_its_batches_refused_and_counted_when_the_buffer_is_full(tmp_path):
    """reject_newest is backpressure for a source that can wait; one that cannot counts its losses."""
    conf = validate({"thing": "gw-1", "sources": [{"type": "simulator"}], "publisher": {"type": "memory"},
                     "buffer": {"path": str(tmp_path / "b.db"), "budget_mb": 1, "policy": "reject_newest"}}, tmp_path)

    class Live(ListSource):
        can_wait = False

    pub = MemoryPublisher()
    pub.hold = True  # nothing is acknowledged: the buffer fills
    live = Live("meter", readings(30_000), size=1000)
    gw = Gateway(conf, publisher=pub, sources=[live]).start()
    for t in gw._source_threads:
        t.join(60)
    assert gw.sources_done
    st = gw.buffer.status()
    assert st["rejected_newest"] > 0 and st["stored"] + st["rejected_newest"] == 30_000
    assert gw.buffer.position("meter") == 30_000  # it moved on past what it lost
    gw.stop()
