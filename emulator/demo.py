"""``gateway demo``: the whole data path on one machine, no AWS account, no device.

1. Makes a CA, a server certificate and client certificates (thing = ``demo-gw``).
2. Starts mosquitto with mutual TLS on a free port of 127.0.0.1, as IoT Core would expect.
3. Subscribes to ``dt/#`` like a topic rule would.
4. Runs the gateway on the bundled sample (``data/sample/readings.csv.gz``), scoring each
   reading with the shipped model when one is present, until everything is acknowledged.
5. Prints what arrived at the broker: messages and readings per topic, one example message,
   the quarantine, and the buffer's status.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import yaml

from gateway.messages import decode

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
THING = "demo-gw"


def demo_config(workdir: Path, port: int, certs, *, model: Path | None, weather: Path | None) -> dict:
    client = certs.client(THING)
    conf: dict = {
        "thing": THING,
        "buffer": {"path": str(workdir / "buffer.db")},
        "sources": [{"type": "replay", "name": "sample", "path": str(SAMPLE)}],
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
        "log_level": "WARNING",
    }
    if model is not None:
        conf["model"] = {"path": str(model), "buildings": str(REPO / "data" / "building_metadata.csv")}
    if weather is not None:
        conf["weather"] = {"path": str(weather)}
    return conf


def run(workdir: Path, say: Callable[[str], None] = print, *, model: bool = True) -> dict:
    """Run the demo in ``workdir`` (wiped first); return a summary dict."""
    from emulator.broker import Mosquitto, make_certs
    from gateway.config import validate
    from gateway.publishers.mqtt import MqttSubscriber
    from gateway.runner import Gateway

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    say(f"· certificates for {THING} and a subscriber in {workdir / 'certs'}")
    certs = make_certs(workdir / "certs", [THING, "demo-rule"])
    with Mosquitto(workdir / "broker", certs) as broker:
        say(f"· mosquitto with mutual TLS on 127.0.0.1:{broker.port}")
        sub_cert = certs.client("demo-rule")
        sub = MqttSubscriber("localhost", "demo-rule", sub_cert.cert, sub_cert.key, certs.ca,
                             port=broker.port, topic_filter="dt/#").start()
        model_dir = _model_dir() if model else None
        weather = REPO / "data" / "sample" / "weather_2016.json.gz"
        raw = demo_config(workdir, broker.port, certs, model=model_dir,
                          weather=weather if model_dir is not None and weather.exists() else None)
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        config = validate(raw, base=workdir)
        say(f"· gateway run --config {workdir / 'gateway.yaml'}  (replay of {SAMPLE.relative_to(REPO)})")
        gw = Gateway(config).start()
        gw.wait(until_idle=True)
        stored = gw.buffer.stats["stored"]
        gw.stop()
        expected = stored
        counted = _Counter()
        sub.wait_for(lambda msgs: counted.update(msgs) >= expected, timeout=30)
        messages = sub.snapshot()
        sub.close()
    per_topic: Counter = Counter()
    readings: Counter = Counter()
    for m in messages:
        per_topic[m.topic] += 1
        readings[m.topic] += decode(m.payload)["n"]
    from gateway.buffer import Buffer

    from gateway.model.scoring import stored_status

    buf = Buffer(workdir / "buffer.db", readonly=True)
    status, quarantined = buf.status(), buf.quarantined()
    status["scoring"] = stored_status(buf.db)
    buf.close()
    summary = {
        "stored": stored,
        "delivered_raw": _count(messages, "raw"),
        "delivered_scored": _count(messages, "scored"),
        "messages": len(messages),
        "topics": {t: {"messages": per_topic[t], "readings": readings[t]} for t in sorted(per_topic)},
        "example": next((decode(m.payload) for m in sorted(messages, key=lambda m: -len(m.payload))
                         if m.topic.endswith("/raw")), None),
        "example_scored": next((decode(m.payload) for m in messages if m.topic.endswith("/scored")), None),
        "quarantine": quarantined,
        "status": status,
    }
    return summary


class _Counter:
    """Raw readings received so far, counted incrementally (the predicate runs per message)."""

    def __init__(self):
        self.seen = 0
        self.raw = 0

    def update(self, messages) -> int:
        for m in messages[self.seen:]:
            if m.topic.endswith("/raw"):
                self.raw += decode(m.payload)["n"]
        self.seen = len(messages)
        return self.raw


def _count(messages, kind: str) -> int:
    return sum(decode(m.payload)["n"] for m in messages if m.topic.endswith("/" + kind))


def _model_dir() -> Path | None:
    try:
        from gateway.model.paths import default_model
    except ImportError:
        return None
    return default_model()


def show(summary: dict, say: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="delivered to the broker")
    t.add_column("topic")
    t.add_column("messages", justify="right")
    t.add_column("readings", justify="right")
    for topic, n in summary["topics"].items():
        t.add_row(topic, f"{n['messages']:,}", f"{n['readings']:,}")
    console.print(t)
    for title, ex in (("a raw message", summary["example"]), ("a scored message", summary["example_scored"])):
        if ex:
            shown = {**ex, "readings": ex["readings"][:3] + (["..."] if len(ex["readings"]) > 3 else [])}
            say(f"{title}, as a topic rule receives it:")
            say("  " + json.dumps(shown))
    sc = summary["status"].get("scoring")
    if sc:
        say(f"model {sc['model']['version']}: {sc['scored']:,} readings scored, {sc['flagged']:,} flagged as anomalies")
    for q in summary["quarantine"]:
        say(f"quarantined: {q['location']}: {q['reason']}")
    say(f"stored {summary['stored']:,} readings; delivered {summary['delivered_raw']:,} raw"
        + (f" and {summary['delivered_scored']:,} scored" if summary["delivered_scored"] else "")
        + f" in {summary['messages']:,} messages; {summary['status']['pending']:,} pending.")
