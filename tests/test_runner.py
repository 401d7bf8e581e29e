"""The runner's wiring, in process, with the in-memory twins of both seams."""

from __future__ import annotations

import threading

from gateway.config import validate
from gateway.messages import decode
from gateway.publishers import MemoryPublisher
from gateway.readings import Reading
from gateway.runner import Gateway
from gateway.sources import Batch, ListSource

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


class Broken:
    """A source that yields one batch and then fails, as a device driver might."""

    name = "broken"

    def batches(self, position, stop: threading.Event):
        if position is None:
            yield Batch(readings(5, building="8"), [], 5)
        raise OSError("serial port vanished")


def test_a_broken_source_stops_itself_never_the_gateway(tmp_path):
    pub = MemoryPublisher()
    gw = Gateway(config(tmp_path), publisher=pub,
                 sources=[Broken(), ListSource("list", readings(40), size=10)]).start()
    assert gw.wait(until_idle=True, timeout=30)
    status = gw.status()
    gw.stop()
    assert status["source_errors"] == {"broken": "OSError: serial port vanished"}
    buildings = {r[0] for m in pub.messages for r in decode(m.payload)["readings"]}
    assert buildings == {"7:steam", "8:steam"}  # the broken source's stored batch went too
    assert sum(decode(m.payload)["n"] for m in pub.messages) == 45
