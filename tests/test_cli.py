"""The ``gateway`` command: run, status and quarantine, with their exact output.

The sample run replays the committed extract (11,134 rows, one of them cut short) into a
memory publisher once per module; status and quarantine then read its buffer read-only.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway.buffer import Buffer
from gateway.cli import main
from gateway.readings import Reading

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
GATEWAY = Path(sys.executable).parent / "gateway"  # the console script of this venv

ROWS = 11_134  # data rows in the sample
VALID = ROWS - 1  # line 10,578 is cut short after 17 of its 19 columns
TRUNCATED_RAW = "997,1,2016-12-13 07:00:00,76.0695,9,Office,38173,,,12.8,,10.6,0.0,1014.5,0.0,0.0,San "

GOOD = f"""\
thing: gw-test-01
buffer: {{path: var/buffer.db}}
sources:
  - {{type: replay, name: sample, path: {SAMPLE}}}
publisher: {{type: memory}}
"""

BAD = f"""\
thing: gw-test-01
buffer: {{path: var/buffer.db}}
sources:
  - {{type: replay, name: sample, path: {SAMPLE}}}
  - {{type: replay, name: fast, path: {SAMPLE}, speed: -3}}
publisher: {{type: memory}}
forwarder: {{batch_size: 101}}
"""
BAD_STDERR_AT = (
    "error: invalid config {path}:\n"
    "sources[1].speed: -3 must be > 0\n"
    "forwarder.batch_size: 101 is out of range 1..100\n"
)


def invoke(*args: str) -> Result:
    # COLUMNS fixes rich's table width, so rows never wrap.
    return CliRunner(env={"COLUMNS": "120"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def table(output: str) -> dict[str, str]:
    """The rows of a two-column rich table: {label: value}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> tuple[Path, Result]:
    """``gateway run --exit-when-idle`` over the sample, once; returns (config path, result)."""
    folder = tmp_path_factory.mktemp("sample-run")
    config = folder / "good.yaml"
    config.write_text(GOOD)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = invoke("run", "--config", config, "--exit-when-idle")
    finally:  # `run` installs its own SIGINT/SIGTERM handlers in this process
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return config, result


# ---------------------------------------------------------------- run


def test_bad_config_exits_2_and_never_starts_the_gateway(tmp_path):
    """A real process: exit code 2, every error on stderr, and no buffer file."""
    assert GATEWAY.exists(), f"{GATEWAY} missing: is the package installed in this venv?"
    (tmp_path / "bad.yaml").write_text(BAD)
    proc = subprocess.run([str(GATEWAY), "run", "--config", "bad.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", BAD_STDERR_AT.format(path="bad.yaml"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.yaml"]  # no var/, no buffer.db


def test_check_accepts_a_good_config_without_starting(tmp_path):
    config = tmp_path / "good.yaml"
    config.write_text(GOOD)
    result = invoke("run", "--config", config, "--check")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{config}: ok\n", "")
    assert not (tmp_path / "var").exists()


def test_check_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    result = invoke("run", "--config", config, "--check")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", BAD_STDERR_AT.format(path=config))


def test_run_with_a_missing_config_file(tmp_path):
    result = invoke("run", "--config", tmp_path / "absent.yaml")
    assert result.exit_code == 2
    assert result.stderr == (f"error: invalid config {tmp_path / 'absent.yaml'}:\n{tmp_path / 'absent.yaml'}: cannot read the config: "
                             "No such file or directory\n")


def mqtt_config(folder: Path, certs, **files: str) -> Path:
    """A config publishing over mqtt to a port nobody listens on, with the thing's real files
    unless ``files`` names others; written to ``folder / "gw.yaml"``."""
    client = certs.client("meter-gw-1")
    paths = {"cert": client.cert, "key": client.key, "ca": certs.ca, **files}
    config = folder / "gw.yaml"
    config.write_text(GOOD.replace("{type: memory}", "{type: mqtt, endpoint: localhost, port: 1, " + ", ".join(
        f"{k}: {v}" for k, v in paths.items()) + "}"))
    return config


def test_check_runs_the_start_checks_without_connecting_or_creating(tmp_path, certs):
    config = mqtt_config(tmp_path, certs)
    result = invoke("run", "--config", config, "--check")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{config}: ok\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.yaml"]


def test_check_refuses_what_a_start_would_fail_on(tmp_path, certs):
    """--check said "ok" to these; a start then failed (a traceback, or a buffer file left behind)."""
    (tmp_path / "garbage.pem").write_text("garbage\n")
    config = mqtt_config(tmp_path, certs, ca="garbage.pem")
    config.write_text(config.read_text().replace("publisher:", "  - {type: simulator, start: not a date}\n"
                                                               "publisher:"))
    result = invoke("run", "--config", config, "--check")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", (
        f"error: invalid config {config}:\n"
        "sources[1].start: 'not a date' is not an ISO 8601 date and time (2016-01-01T00:00:00Z)\n"))
    config.write_text(config.read_text().replace("start: not a date", "start: 2016-01-01T00:00:00Z"))
    result = invoke("run", "--config", config, "--check")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", (
        f"error: invalid config {config}:\npublisher.ca: garbage.pem holds no PEM certificate to trust\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pem", "gw.yaml"]


def test_a_start_runs_the_same_checks_and_leaves_no_buffer_file(tmp_path, certs):
    """A real process, no --check: the key of another thing is refused before the buffer exists."""
    mqtt_config(tmp_path, certs, key=certs.client("test-subscriber").key)
    proc = subprocess.run([str(GATEWAY), "run", "--config", "gw.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", (
        "error: invalid config gw.yaml:\n"
        f"publisher.key: {certs.client('test-subscriber').key} does not match the certificate in publisher.cert "
        f"({certs.client('meter-gw-1').cert})\n"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gw.yaml"]  # no var/, no buffer.db


def test_run_stores_and_delivers_every_valid_reading(sample_run):
    config, result = sample_run
    assert result.exit_code == 0, result.output
    m = re.fullmatch(rf"stopped: {VALID} stored, {VALID} delivered, 1 quarantined, (\d+) messages published\n",
                     result.stdout)
    assert m, result.stdout
    # at most 100 readings a message; how many fewer than full depends on claim timing
    assert int(m.group(1)) >= -(-VALID // 100)
    assert (config.parent / "var" / "buffer.db").exists()  # relative to the config's folder


# ---------------------------------------------------------------- status


def test_status_json_counts_every_reading(sample_run):
    config, _ = sample_run
    result = invoke("status", "--config", config, "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    st = json.loads(result.stdout)
    assert st["path"] == str(config.parent.resolve() / "var" / "buffer.db")
    assert {k: st[k] for k in ("received", "stored", "delivered", "pending", "quarantined", "quarantine",
                               "duplicates", "evicted_oldest", "rejected_newest", "undeliverable", "resend")} == {
        "received": VALID, "stored": VALID, "delivered": VALID, "pending": 0, "quarantined": 1, "quarantine": 1,
        "duplicates": 0, "evicted_oldest": 0, "rejected_newest": 0, "undeliverable": 0, "resend": 0,
    }
    assert (st["oldest_pending_ts"], st["policy"], st["budget_bytes"]) == (None, "drop_oldest", 1024 * 2**20)


def test_status_table_after_the_sample_run(sample_run):
    config, _ = sample_run
    result = invoke("status", "--config", config)
    assert (result.exit_code, result.stderr) == (0, "")
    rows = table(result.stdout)
    assert {k: rows[k] for k in ("pending readings", "oldest unsent", "stored / delivered", "duplicates ignored",
                                 "quarantined", "evictions", "live lane")} == {
        "pending readings": "0",
        "oldest unsent": "-",
        "stored / delivered": "11,133 / 11,133",
        "duplicates ignored": "0",
        "quarantined": "1 readings, 0 messages",
        "evictions": "0 oldest dropped, 0 newest refused",
        "live lane": "closed",
    }


def test_status_table_shows_pending_and_evictions(tmp_path):
    """A buffer over its budget with nothing delivered: pending and evicted add up to what came in."""
    db = tmp_path / "b.db"
    buf = Buffer(db, budget_bytes=256 * 1024, policy="drop_oldest", live_window_ms=10**12)
    t0 = 1_451_606_400_000  # 2016-01-01T00:00:00Z
    for start in range(0, 30_000, 500):
        buf.put([Reading("0", "1", "electricity", t0 + i * 60_000, float(i), "test")
                 for i in range(start, start + 500)])
    buf.close()

    st = json.loads(invoke("status", "--db", db, "--json").stdout)
    assert st["evicted_oldest"] > 0 and st["pending"] + st["evicted_oldest"] == 30_000

    result = invoke("status", "--db", db)
    assert (result.exit_code, result.stderr) == (0, "")
    rows = table(result.stdout)
    assert rows["pending readings"] == f"{st['pending']:,}"
    oldest = datetime.fromtimestamp(st["oldest_pending_ts"] / 1000, timezone.utc)
    assert oldest > datetime(2016, 1, 1, tzinfo=timezone.utc)  # the oldest readings were the ones dropped
    assert rows["oldest unsent"].startswith(f"{oldest:%Y-%m-%d %H:%M:%S}Z (")
    assert rows["evictions"] == f"{st['evicted_oldest']:,} oldest dropped, 0 newest refused"
    assert rows["stored / delivered"] == f"{st['stored']:,} / 0"


def test_status_of_a_missing_buffer_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("status", "--db", "missing.db")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "error: missing.db: no buffer here (has the gateway run with this buffer path?)\n"
    assert not Path("missing.db").exists()


def test_status_never_creates_the_buffer_of_a_config(tmp_path):
    config = tmp_path / "good.yaml"
    config.write_text(GOOD)
    result = invoke("status", "--config", config)
    db = tmp_path.resolve() / "var" / "buffer.db"
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"error: {db}: no buffer here (has the gateway run with this buffer path?)\n"
    assert not (tmp_path / "var").exists()


def test_status_needs_config_or_db():
    result = invoke("status")
    assert result.exit_code == 2
    assert result.stderr.endswith("Error: give --config or --db\n")


def test_status_with_a_bad_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    result = invoke("status", "--config", config)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", BAD_STDERR_AT.format(path=config))


# ---------------------------------------------------------------- quarantine


def test_quarantine_lists_the_truncated_row(sample_run):
    config, _ = sample_run
    result = invoke("quarantine", "--config", config)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "#1 reading readings.csv.gz:10578 (sample): columns: 17 instead of 19",
        f"    {TRUNCATED_RAW}",
    ]


def test_quarantine_json_is_one_object_per_line(sample_run):
    config, _ = sample_run
    result = invoke("quarantine", "--config", config, "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    (line,) = result.stdout.splitlines()
    entry = json.loads(line)
    assert isinstance(entry.pop("at"), int)
    assert entry == {"id": 1, "kind": "reading", "reason": "columns: 17 instead of 19", "raw": TRUNCATED_RAW,
                     "source": "sample", "location": "readings.csv.gz:10578"}


def test_quarantine_filtered_to_messages_is_empty(sample_run):
    config, _ = sample_run
    result = invoke("quarantine", "--config", config, "--kind", "message")
    assert (result.exit_code, result.stdout) == (0, "quarantine is empty\n")


@pytest.mark.parametrize("command", ["nucleus", "dashboard"])
def test_an_emulation_command_on_a_device_says_the_emulator_is_not_installed(tmp_path, command):
    """A device ships gateway/ alone: the emulation's commands say so, and the rest still runs."""
    (tmp_path / "emulator.py").write_text('raise ImportError("no module named emulator")\n')
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gateway.cli import main; "
            "main(sys.argv[2:])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), command, "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (1, (
        f"Error: gateway {command} is part of the local emulation, which is not installed here "
        "(no module named emulator); install the project with its emulator extra"))
    listed = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert listed.returncode == 0 and "status" in listed.stdout, listed.stderr
