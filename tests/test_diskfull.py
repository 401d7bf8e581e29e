"""A full disk, for real: a real `gateway run` fills a small tmpfs, and a small budget is kept.

Each test mounts its own tmpfs (``mount -t tmpfs``; unmounted at teardown), puts the buffer on
it, and runs the real gateway (a subprocess) with a simulator as fast as possible and the real
mosquitto behind a :class:`~conftest.Link` the test cuts and restores. The uplink is cut from
the start, so nothing is in flight when the disk fills and every reading the subscriber sees
was delivered after the link came back.

What must hold, read from ``gateway status --json`` after a clean stop and from the subscriber:

- stored = delivered (distinct readings the subscriber saw) + pending + evicted, exactly, and
  every reading the simulator produced is received and either stored or counted refused;
- the gateway neither dies nor prints a traceback on ENOSPC, stops cleanly on a full disk,
  starts again on a full disk, and recovers by itself when space comes back;
- with a budget smaller than the disk, the database file plus its ``-wal`` stay within it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gateway.buffer import Buffer
from gateway.messages import decode
from gateway.sources.simulator import SimulatorSource

from conftest import THING

REPO = Path(__file__).resolve().parents[1]
START = "2026-01-01T00:00:00Z"
START_MS = 1_767_225_600_000
MIB = 1 << 20
METERS, TICKS = 200, 1000  # 200,000 readings: tens of MB of buffer, far more than the disk
TOTAL = METERS * TICKS


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of ``size`` (e.g. "4m"); every mount is undone at teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def wait_until(predicate, timeout: float, every: float = 0.2):
    """Poll ``predicate`` until it is truthy; return its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(every)


class Gateway:
    """A real `gateway run` subprocess; its stdout and stderr go to files off the tmpfs."""

    def __init__(self, config: Path, logdir: Path):
        self.config = config
        self.logdir = logdir
        self.runs = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        self.runs += 1
        self.out = self.logdir / f"run{self.runs}.out"
        self.err = self.logdir / f"run{self.runs}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
            stdout=open(self.out, "wb"), stderr=open(self.err, "wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO,
        )
        return self

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def all_stderr(self) -> str:
        return "".join((self.logdir / f"run{i}.err").read_text(errors="replace") for i in range(1, self.runs + 1))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as Greengrass stops a component; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def write_config(tmp_path: Path, db: Path, link, certs, *, policy: str, budget_mb: float) -> Path:
    client = certs.client(THING)
    conf = {
        "thing": THING,
        "buffer": {"path": str(db), "budget_mb": budget_mb, "policy": policy},
        "sources": [{"type": "simulator", "name": "sim", "meters": METERS, "seed": 3, "start": START,
                     "speed": None, "count": TICKS}],
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": link.port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
        "forwarder": {"window": 16, "claim_size": 500, "backoff_min_s": 0.05, "backoff_max_s": 0.5},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def peek(db: Path, budget_bytes: int = 64 * MIB) -> dict | None:
    """The buffer's status read beside the running gateway (None if it cannot be read now)."""
    try:
        b = Buffer(db, budget_bytes=budget_bytes, readonly=True)
    except Exception:
        return None
    try:
        return b.status()
    except Exception:
        return None
    finally:
        b.db.close()


def status_json(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--config", str(config), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, f"gateway status failed: {out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def delivered_keys(subscriber) -> set[tuple[str, int]]:
    return {(r[0], r[1]) for m in subscriber.snapshot() if m.topic.endswith("/raw")
            for r in decode(m.payload)["readings"]}


def expected_keys() -> set[tuple[str, int]]:
    src = SimulatorSource("sim", meters=METERS, seed=3, start_ms=START_MS, speed=None, count=TICKS)
    return {(r.meter_id, r.ts) for b in src.batches(None, threading.Event()) for r in b.readings}


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def files(mnt: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(mnt.iterdir())}


def said_disk_full(gw: Gateway) -> bool:
    return "full" in gw.stderr().lower()


def check_accounts(config: Path, subscriber, gw: Gateway) -> dict:
    """The final accounting after a clean stop: every reading produced is accounted for."""
    st = status_json(config)
    got = delivered_keys(subscriber)
    assert got <= expected_keys(), "the subscriber saw readings the simulator never produced"
    assert st["pending"] == 0, st
    assert st["received"] == TOTAL, (
        f"received {st['received']} of the {TOTAL} readings the simulator produced: "
        f"a batch was lost or counted twice on the way in; {st}")
    assert st["received"] == st["stored"] + st["duplicates"] + st["quarantined"] + st["rejected_newest"], st
    assert st["stored"] == len(got) + st["pending"] + st["evicted_oldest"], (
        f"stored {st['stored']} != delivered {len(got)} + pending {st['pending']} + evicted "
        f"{st['evicted_oldest']}: {st['stored'] - len(got) - st['pending'] - st['evicted_oldest']} readings "
        f"unaccounted for; {st}")
    assert "Traceback" not in gw.all_stderr(), gw.all_stderr()[-4000:]
    assert "error: source" not in gw.all_stderr(), gw.all_stderr()[-4000:]
    return st


@pytest.mark.parametrize("policy, recovery", [("drop_oldest", "remount"), ("reject_newest", "filler")])
def test_a_full_disk_loses_nothing_acknowledged_and_recovers_by_itself(
        tmp_path, tmpfs, link, certs, subscriber, policy, recovery):
    """The budget (64 MB) is far above the disk (4 MB): the disk fills first."""
    mnt = tmpfs("4m")
    filler = mnt / "filler"
    if recovery == "filler":
        filler.write_bytes(b"\0" * (3 * MIB // 2))
    db = mnt / "buffer.db"
    config = write_config(tmp_path, db, link, certs, policy=policy, budget_mb=64)
    link.cut()  # nothing drains: the buffer grows until the disk is full
    gw = Gateway(config, tmp_path).start()
    try:
        assert wait_until(lambda: said_disk_full(gw) or not gw.alive(), timeout=90), (
            f"the disk never filled, or the gateway never said so; {free_bytes(mnt)} bytes free; "
            f"stderr:\n{gw.stderr()[-3000:]}")
        assert gw.alive(), f"gateway run died on a full disk (exit {gw.proc.returncode}):\n{gw.stderr()[-4000:]}"
        assert "source sim stopped" not in gw.stderr(), f"the source died on a full disk:\n{gw.stderr()[-4000:]}"
        full = peek(db)
        assert full is not None, f"the buffer cannot be read beside the gateway on a full disk ({free_bytes(mnt)} B free)"
        assert gw.alive()
        assert "Traceback" not in gw.stderr(), gw.stderr()[-4000:]

        # A stop on a full disk is a clean stop, and the gateway starts again on a full disk.
        rc = gw.stop()
        assert rc == 0 and "Traceback" not in gw.stderr(), f"exit {rc} stopping on a full disk:\n{gw.stderr()[-4000:]}"
        gw.start()
        assert wait_until(lambda: said_disk_full(gw) or not gw.alive()
                          or ((s := peek(db)) is not None and s["stored"] > full["stored"] + 10_000), timeout=60), (
            f"the restarted gateway neither met the full disk nor made progress: {peek(db)}; "
            f"stderr:\n{gw.stderr()[-3000:]}")
        assert gw.alive(), f"gateway run died starting on a full disk (exit {gw.proc.returncode}):\n{gw.stderr()[-4000:]}"
        assert "source sim stopped" not in gw.stderr(), f"the source died on a full disk:\n{gw.stderr()[-4000:]}"
        stored_when_full = status_json(config)["stored"]

        # Space comes back, and so does the link: the gateway carries on by itself.
        if recovery == "filler":
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        link.restore()
        settled = wait_until(lambda: (s := peek(db)) is not None and s["received"] == TOTAL and s["pending"] == 0
                             and s["stored"] > stored_when_full and s, timeout=240, every=0.5)
        assert settled, (
            f"the gateway did not recover after space came back: {peek(db)}; files {files(mnt)}, "
            f"{free_bytes(mnt):,} bytes free; stderr:\n{gw.stderr()[-4000:]}")
        assert gw.alive(), gw.stderr()[-4000:]
        rc = gw.stop()
        assert rc == 0, f"exit {rc}:\n{gw.stderr()[-4000:]}"
    finally:
        gw.kill()
    st = check_accounts(config, subscriber, gw)
    assert st["stored"] > stored_when_full, "nothing was ingested after space came back"
    got = delivered_keys(subscriber)
    last_tick = START_MS + (TICKS - 1) * 60_000
    if policy == "drop_oldest":  # the newest readings are the ones kept
        assert any(ts == last_tick for _, ts in got), "the last tick was never delivered"
        assert st["evicted_oldest"] + st["rejected_newest"] > 0 or st["stored"] == TOTAL, st
    else:
        assert st["evicted_oldest"] == 0, st


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_newest"])
def test_the_budget_bounds_the_database_file_and_its_wal(tmp_path, tmpfs, link, certs, subscriber, policy):
    """A 1 MB budget on a 16 MB disk: db + -wal never exceed 1 MB, and every eviction is counted."""
    mnt = tmpfs("16m")
    db = mnt / "buffer.db"
    wal = mnt / "buffer.db-wal"
    budget = 1 * MIB
    config = write_config(tmp_path, db, link, certs, policy=policy, budget_mb=1)
    link.cut()  # nothing drains: the budget is reached and its policy applies
    sizes: list[tuple[int, int]] = []
    done = threading.Event()

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return 0

    def sample():
        while not done.wait(0.005):
            sizes.append((size(db), size(wal)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gw = Gateway(config, tmp_path).start()
    try:
        def at_budget() -> bool:
            s = peek(db, budget)
            return s is not None and (
                s["used_bytes"] >= 0.9 * budget or s["evicted_oldest"] + s["rejected_newest"] > 0
                or any(st.get("state") != "running" for st in ((s["health"] or {}).get("stages") or {}).values())
                or "source sim finished" in gw.stderr())

        full = wait_until(lambda: at_budget() or not gw.alive(), timeout=120)
        assert full and gw.alive(), f"the budget was never used up: {peek(db, budget)}; stderr:\n{gw.stderr()[-3000:]}"
        # Keep ingesting at the budget for a while (a thousand samples of the file sizes, ~5 s).
        seen = len(sizes)
        assert wait_until(lambda: len(sizes) >= seen + 1000 or not gw.alive(), timeout=60) and gw.alive(), (
            gw.stderr()[-3000:])
        if policy == "drop_oldest":  # every eviction is counted, and shown by gateway status
            assert wait_until(lambda: (s := peek(db, budget)) is not None and s["evicted_oldest"] > 0, timeout=10), (
                f"the budget is used and the oldest must go, but gateway status shows no eviction: {peek(db, budget)}; "
                f"largest db + -wal so far {max(map(sum, sizes)):,} bytes")
        link.restore()
        settled = wait_until(lambda: (s := peek(db)) is not None and s["received"] == TOTAL and s["pending"] == 0,
                             timeout=240, every=0.5)
        assert settled, f"the gateway did not drain: {peek(db)}; stderr:\n{gw.stderr()[-4000:]}"
        rc = gw.stop()
        assert rc == 0, f"exit {rc}:\n{gw.stderr()[-4000:]}"
    finally:
        done.set()
        sampler.join()
        gw.kill()
    worst = max(sizes, key=sum)
    assert sum(worst) <= budget, (
        f"the database file and its -wal reached {sum(worst):,} bytes ({worst[0]:,} + {worst[1]:,} -wal) "
        f"against a budget of {budget:,}; largest file alone {max(s[0] for s in sizes):,}, "
        f"largest -wal {max(s[1] for s in sizes):,}")
    st = check_accounts(config, subscriber, gw)
    assert st["used_bytes"] <= budget, st
    if policy == "drop_oldest":
        assert st["evicted_oldest"] > 0 and st["rejected_newest"] == 0, st
    else:  # the newest are refused (counted) or held back at the source; the oldest are never dropped
        assert st["evicted_oldest"] == 0, st
