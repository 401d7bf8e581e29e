"""``gateway demo`` end to end, as ``make demo`` runs it, in its own process and a tmp work folder.

The real chain: both components built, mosquitto, the local nucleus running them, the Modbus
fleet, the rules engine, Firehose/S3/Athena, IoT Analytics and the dashboard. One run with
``--exit`` (the summary line, delivered == sent, anomalies, the dashboard answering while the
chain runs), one run interrupted with SIGINT while the gateway is delivering (every process the
demo started is gone afterwards).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from emulator.nucleus.runner import wait_for

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^sent=(\d+) delivered=(\d+) anomalies=(\d+)$", re.M)
URL = re.compile(r"dashboard at (http://127\.0\.0\.1:\d+/)")
SAMPLE_READINGS = 11_133  # the sample's 11,134 rows less the one cut short


class Demo:
    """``gateway demo`` as a subprocess; its output collected line by line."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--workdir", str(workdir),
                                      "--port", "0", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: re.Pattern, timeout: float) -> re.Match:
        found: list[re.Match] = []

        def seen() -> bool:
            found[:] = [m for m in map(pattern.search, list(self.lines)) if m]
            return bool(found) or self.proc.poll() is not None
        assert wait_for(seen, timeout), f"no {pattern.pattern!r} within {timeout} s:\n{self.output}"
        assert found, f"the demo ended (exit {self.proc.returncode}) without {pattern.pattern!r}:\n{self.output}"
        return found[0]

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def descendants(self) -> dict[int, str]:
        return descendants(self.proc.pid)

    def runs(self, word: str) -> bool:
        return any(word in cmd for cmd in self.descendants().values())


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every live process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), fields[0], cmd)
    return out


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process below ``pid``."""
    procs = _processes()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state, cmd) in procs.items():
            if ppid == parent and child not in found:
                if state != "Z":
                    found[child] = cmd
                todo.append(child)
    return found


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def alive(procs: dict[int, str]) -> list[str]:
    """Those of ``procs`` still running (a zombie has exited), by pid and command line."""
    now = _processes()
    return [f"{pid} {cmd[:120]}" for pid, cmd in procs.items()
            if pid in now and now[pid][1] != "Z" and now[pid][2] == cmd]


@pytest.mark.timeout(300)
def test_gateway_demo_exit_delivers_every_reading_and_flags_anomalies(tmp_path):
    t0 = time.monotonic()
    demo = Demo(tmp_path / "demo", "--exit")
    url = demo.wait_line(URL, 120).group(1)
    buildings = get_json(url + "api/buildings")  # the dashboard answers while the chain runs
    assert "sites" in buildings or "error" in buildings
    # the nucleus and the gateway component it runs are this demo's processes
    assert wait_for(lambda: demo.runs("main.py"), 120), demo.output
    code = demo.finish(240)
    assert code == 0, demo.output
    sent, delivered, anomalies = map(int, SUMMARY.findall(demo.output)[-1])
    assert demo.lines[-1] == f"sent={sent} delivered={delivered} anomalies={anomalies}"
    assert delivered == sent
    assert sent > SAMPLE_READINGS  # the sample and the fleet's readings through the modbus source
    assert anomalies > 0
    assert re.search(r"^sources: sample \(replay of readings\.csv\.gz\) 11,133 readings delivered; "
                     r"fleet \(modbus\) (\d+)$", demo.output, re.M), demo.output
    assert "quarantined: sample.csv.gz:10578: columns: 17 instead of 19" in demo.output
    assert re.search(r"^legacy IoT Analytics: [\d,]+ meter-thing messages, [\d,]+ in the datastore", demo.output,
                     re.M)
    print(f"\ndemo --exit took {time.monotonic() - t0:.1f} s\n{demo.output}")


@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path):
    demo = Demo(tmp_path / "demo")
    url = demo.wait_line(URL, 120).group(1)
    assert isinstance(get_json(url + "api/buildings"), dict)
    # interrupted while the gateway runs in the nucleus: mosquitto, the nucleus, its components
    assert wait_for(lambda: demo.runs("main.py"), 120), demo.output
    started = demo.descendants()
    names = " | ".join(started.values())
    assert "mosquitto" in names and "gateway.cli nucleus" in names and "main.py" in names, names
    demo.proc.send_signal(signal.SIGINT)
    code = demo.finish(90)
    assert code == 130, demo.output
    assert "interrupted: stopping everything the demo started" in demo.output
    assert wait_for(lambda: not alive(started), 10), alive(started)
    # the dashboard's port is closed too
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


CYCLE_SUMMARY = re.compile(r"^sent=(\d+) delivered=(\d+) anomalies=(\d+) promoted=([^\s>]+)->(\S+) "
                           r"drift_before=(\d+\.\d+) drift_after=(\d+\.\d+)$")


@pytest.mark.timeout(300)
def test_gateway_demo_cycle_promotes_a_retrained_model_and_drift_falls(tmp_path):
    from emulator.athena import LocalAthena
    from emulator.dashboard import Dashboard, health_dir_for
    from emulator.rules.engine import ANALYTICS

    t0 = time.monotonic()
    demo = Demo(tmp_path / "demo", "--cycle", "--exit")
    code = demo.finish(280)
    assert code == 0, demo.output
    m = CYCLE_SUMMARY.match(demo.lines[-1])
    assert m, demo.output
    sent, delivered, anomalies = map(int, m.groups()[:3])
    old, new = m.group(4), m.group(5)
    before, after = float(m.group(6)), float(m.group(7))
    assert delivered == sent == SAMPLE_READINGS  # nothing lost across the swap
    assert anomalies > 0
    assert old != new and old.startswith("ashrae-lgbm-") and new.startswith("ashrae-lgbm-")
    assert after < before
    assert re.search(rf"^cycle: promoted={re.escape(old)}->{re.escape(new)} component=\d+\.\d+\.\d+ ", demo.output,
                     re.M), demo.output
    assert f"· the gateway swapped to {new}" in demo.output
    # the dashboard over what the demo left: both models on the shifted site's charts, the switch
    # between them, and the gateway's model band switching too
    root = tmp_path / "demo" / "cloud"
    athena = LocalAthena(root, ANALYTICS, bucket="metergateway-data")
    board = Dashboard(athena, health_dir_for(root, ANALYTICS), port=0)
    url = board.start()
    try:
        chart = get_json(url + "api/consumption?site=15&building=1331")
        health = get_json(url + "api/health?thing=demo-gw")
    finally:
        board.stop()
        athena.close()
    electricity = next(s for s in chart["series"] if s["meter_type"] == "electricity")
    assert [(s["from"], s["to"]) for s in electricity["switches"]] == [(old, new)]
    assert [(s["from"], s["to"]) for s in health["switches"]] == [(old, new)]
    print(f"\ndemo --cycle --exit took {time.monotonic() - t0:.1f} s\n{demo.output}")
