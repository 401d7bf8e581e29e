"""One gateway per buffer: the lock file ``<buffer>.lock``, with real processes.

Two ``gateway run`` on one buffer used to fight over its rows (``UNIQUE constraint failed``),
its cursors and one MQTT client id, and sent 37-56 % duplicates. Now the second refuses to
start, naming the lock file and the pid of the gateway that holds it, and the first goes on.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from gateway.buffer import Buffer
from gateway.errors import BufferCorrupt, BufferLocked
from gateway.messages import decode
from gateway.readings import Reading
from gateway.sources.simulator import SimulatorSource

from conftest import THING

REPO = Path(__file__).resolve().parents[1]
GATEWAY = Path(sys.executable).parent / "gateway"  # the console script of this venv
START, START_MS = "2026-01-01T00:00:00Z", 1_767_225_600_000

# A process that opens a writable Buffer (or only flocks the lock file, with "bare"), says
# "ready", closes it on "close" (and says "closed"), and exits at the end of its stdin.
HOLDER = """
import fcntl, os, sys
from gateway.buffer import Buffer
path, how = sys.argv[1], sys.argv[2]
if how == "bare":
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
else:
    buf = Buffer(path)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "close":
        buf.close()
        print("closed", flush=True)
"""


class Holder:
    """A real process holding the buffer at ``path`` (see HOLDER)."""

    def __init__(self, path: Path, how: str = "buffer"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), how], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()  # blocks until the holder has its lock (or died)
        assert line == "ready\n", f"holder did not start: {line!r} {self.proc.stderr.read()}"
        self.pid = self.proc.pid

    def say(self, word: str) -> str:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "buffer.db"


@pytest.fixture
def holder(db_path):
    made: list[Holder] = []

    def make(how: str = "buffer") -> Holder:
        made.append(Holder(db_path, how))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def locked_message(db_path: Path, pid: int | None) -> str:
    who = f"pid {pid}" if pid is not None else "another process"
    return (f"{db_path} is in use by another gateway ({who} holds {db_path}.lock); "
            "stop it first: one buffer serves one gateway at a time")


def readings(n: int) -> list[Reading]:
    return [Reading("1", "7", "electricity", START_MS + i * 60_000, 1.0, "s") for i in range(n)]


# ---------------------------------------------------------------- two real gateways


def write_config(tmp_path: Path, broker, certs, meters: int, ticks: int) -> Path:
    client = certs.client(THING)
    conf = {
        "thing": THING,
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "sources": [{"type": "simulator", "name": "sim", "meters": meters, "seed": 3, "start": START,
                     "speed": 3000.0, "count": ticks}],
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
        "forwarder": {"window": 16, "claim_size": 500, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_a_second_gateway_on_one_buffer_refuses_and_the_first_delivers_everything_once(
        tmp_path, broker, certs, subscriber):
    meters, ticks = 20, 300  # 6,000 readings over about 6 s of wall time
    config = write_config(tmp_path, broker, certs, meters, ticks)
    src = SimulatorSource("sim", meters=meters, seed=3, start_ms=START_MS, speed=None, count=ticks)
    expected = [(r.meter_id, r.ts) for b in src.batches(None, threading.Event()) for r in b.readings]
    keys: list[tuple[str, int]] = []
    seen = [0]

    def received(messages) -> list[tuple[str, int]]:
        for m in messages[seen[0]:]:
            keys.extend((r[0], r[1]) for r in decode(m.payload)["readings"])
        seen[0] = len(messages)
        return keys

    db = tmp_path / "buffer.db"
    first = subprocess.Popen([str(GATEWAY), "run", "--config", str(config), "--exit-when-idle"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert subscriber.wait_for(lambda msgs: len(received(msgs)) >= 100, timeout=60), first.stderr.read()
        second = subprocess.run([str(GATEWAY), "run", "--config", str(config)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        status = subprocess.run([str(GATEWAY), "status", "--db", str(db), "--json"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert first.poll() is None, "the first gateway ended before the second one tried"
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert (second.returncode, second.stdout, second.stderr) == (2, "", f"error: {locked_message(db, first.pid)}\n")
    assert status.returncode == 0, status.stderr  # a read-only status takes no lock
    assert json.loads(status.stdout)["path"] == str(db)
    assert first.returncode == 0, err
    assert out.startswith(f"stopped: {len(expected)} stored, {len(expected)} delivered, 0 quarantined"), out
    assert subscriber.wait_for(lambda msgs: len(received(msgs)) >= len(expected), timeout=30)
    assert sorted(keys) == sorted(expected)  # every reading, once


# ---------------------------------------------------------------- the lock file


def test_a_buffer_held_by_another_process_is_refused_with_its_pid(db_path, holder):
    h = holder()
    with pytest.raises(BufferLocked) as info:
        Buffer(db_path)
    assert str(info.value) == locked_message(db_path, h.pid)
    assert info.value.pid == h.pid
    assert (db_path.parent / "buffer.db.lock").read_text() == f"{h.pid}\n"


def test_read_only_buffer_takes_no_lock(db_path, holder):
    h = holder()
    buf = Buffer(db_path, readonly=True)
    assert buf.pending() == 0
    buf.close()
    assert h.proc.poll() is None


def test_close_releases_the_lock(db_path, holder):
    h = holder()
    assert h.say("close") == "closed\n"
    buf = Buffer(db_path)  # the holder still runs, but no longer holds the buffer
    buf.put(readings(3))
    assert buf.pending() == 3
    assert (db_path.parent / "buffer.db.lock").read_text() == f"{os.getpid()}\n"
    buf.close()


def test_the_lock_of_a_killed_gateway_never_blocks_a_restart(db_path, holder):
    h = holder()
    h.kill()  # kill -9: the lock file stays, with the dead pid in it
    assert (db_path.parent / "buffer.db.lock").read_text() == f"{h.pid}\n"
    buf = Buffer(db_path)
    assert (db_path.parent / "buffer.db.lock").read_text() == f"{os.getpid()}\n"
    buf.close()


def test_a_holder_that_wrote_no_pid_is_named_by_its_file(db_path, holder):
    holder("bare")
    with pytest.raises(BufferLocked) as info:
        Buffer(db_path)
    assert str(info.value) == locked_message(db_path, None)
    assert info.value.pid is None


def lockable_elsewhere(db_path: Path) -> bool:
    """Whether another process can take the buffer's lock right now."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(1)")
    proc = subprocess.run([sys.executable, "-c", code, f"{db_path}.lock"], capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def test_a_buffer_that_fails_to_open_lets_go_of_the_lock(db_path):
    Buffer(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("INSERT OR REPLACE INTO state VALUES('cursor', 'not json')")
    db.commit()
    db.close()
    with pytest.raises(BufferCorrupt):
        Buffer(db_path)
    assert lockable_elsewhere(db_path)


def test_two_buffers_of_one_process_share_the_lock(db_path):
    """A test that simulates a crash reopens the file while the old object lives: allowed."""
    a = Buffer(db_path)
    b = Buffer(db_path)
    b.close()
    assert not lockable_elsewhere(db_path)  # a still holds it
    a.close()
    assert lockable_elsewhere(db_path)  # the last holder let go
