"""gateway bench --json: one JSON object as the last line, with every measure the issues name.

Speed is what the bench measures, as ratios against raw limits in the same run; this test only
checks that every stage ran and reported, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_reports_every_stage():
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "bench", "--readings", "5000",
                          "--startup-readings", "50000", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=240)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ingest_ratio", "drain_readings_per_s", "wire_bytes_per_reading", "peak_rss_mb", "score_ratio",
                "startup_s", "drain_ratio", "gateway_readings_per_s"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["readings"] == 5000
    assert result["gateway_scored"] is True
    assert result["drain_target"].startswith("local mosquitto")
    assert result["wire_bytes_per_reading"] > result["payload_bytes_per_reading"]  # MQTT framing counted
    assert "· ingest: Buffer.put vs bare executemany" in out.stderr  # progress goes to stderr with --json
