"""``gateway run``: sources → buffer → forwarder, wired from a :class:`~gateway.config.Config`.

One thread per source puts batches into the buffer (readings and source position in one
transaction); one thread forwards. Stopping (Ctrl-C, SIGTERM, or :meth:`Gateway.stop`) lets
each source finish the batch it is storing, gives the forwarder a moment to collect the
PUBACKs in flight, and closes the buffer. Anything not acknowledged stays in the buffer and is
sent on the next start: nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gateway.buffer import Buffer
from gateway.config import Config
from gateway.forwarder import Backoff, Forwarder
from gateway.publishers import MemoryPublisher, Publisher
from gateway.sources import Source

log = logging.getLogger(__name__)


def build_source(spec: dict) -> Source:
    if spec["type"] == "replay":
        from gateway.sources.replay import ReplaySource

        return ReplaySource(spec["name"], spec["path"], speed=spec["speed"], batch_size=spec["batch_size"])
    from gateway.sources.simulator import SimulatorSource

    kwargs: dict[str, Any] = {}
    if spec.get("start"):
        from datetime import datetime, timezone

        start = datetime.fromisoformat(spec["start"].replace("Z", "+00:00"))
        if start.tzinfo is None:
            start = start.replace(tzinfo=timezone.utc)
        kwargs["start_ms"] = int(start.timestamp() * 1000)
    return SimulatorSource(
        spec["name"], meters=spec["meters"], seed=spec["seed"], interval_s=spec["interval_s"],
        speed=spec["speed"], anomaly_rate=spec["anomaly_rate"], count=spec["count"],
        labels_path=spec["labels_path"], **kwargs,
    )


def build_publisher(config: Config) -> Publisher:
    p = config.publisher
    if p["type"] == "memory":
        return MemoryPublisher()
    from gateway.publishers.mqtt import MqttPublisher

    pub = MqttPublisher(p["endpoint"], config.thing, p["cert"], p["key"], p["ca"], port=p["port"], local=p["local"])
    return pub.start()


def build_scorer(config: Config, db_path: Any) -> Any:
    """The forwarder's scorer from ``model:`` and ``weather:``, or None when scoring is off.

    A model that fails its checks raises ModelError: the gateway does not start with it."""
    m = config.model
    if not m or not m.get("enabled", True):
        return None
    from gateway.model.features import Buildings
    from gateway.model.online import MeterStats
    from gateway.model.scoring import ModelHolder, ReadingScorer

    holder = ModelHolder(m["path"], threads=m["threads"])
    weather, max_age = None, 3 * 3600 * 1000
    if config.weather:
        from gateway.sources.weather import WeatherReplay

        weather = WeatherReplay(config.weather["path"]).table(retain_ms=None)
        max_age = config.weather["max_age_ms"]
    return ReadingScorer(holder, Buildings.from_csv(m["buildings"]), stats=MeterStats(threshold=m["threshold"]),
                         weather=weather, weather_max_age_ms=max_age, db_path=db_path)


class Gateway:
    """The running gateway. ``publisher``, ``sources`` and ``scorer`` may be injected (tests)."""

    def __init__(self, config: Config, *, publisher: Publisher | None = None,
                 sources: list[Source] | None = None, scorer: Any = None):
        self.config = config
        b = config.buffer
        self.buffer = Buffer(b["path"], budget_bytes=b["budget_bytes"], policy=b["policy"],
                             live_window_ms=b["live_window_ms"], synchronous=b["synchronous"])
        self.sources = sources if sources is not None else [build_source(s) for s in config.sources]
        if scorer is None:
            try:
                scorer = build_scorer(config, b["path"])
            except Exception:
                self.buffer.close()
                raise
        self.scorer = scorer
        self.publisher = publisher if publisher is not None else build_publisher(config)
        f = config.forwarder
        self.forwarder = Forwarder(
            self.buffer, self.publisher, config.thing, app=config.app, batch_size=f["batch_size"],
            claim_size=f["claim_size"], window=f["window"], ack_timeout_s=f["ack_timeout_s"],
            backoff=Backoff(f["backoff_min_s"], f["backoff_max_s"]), scorer=scorer,
        )
        self.stop_event = threading.Event()
        self._source_threads: list[threading.Thread] = []
        self._forwarder_thread: threading.Thread | None = None
        self.source_errors: dict[str, str] = {}

    # ------------------------------------------------------------------ threads

    def _read(self, source: Source) -> None:
        position = self.buffer.position(source.name)
        log.info("source %s starts at position %r", source.name, position)
        try:
            for batch in source.batches(position, self.stop_event):
                self.buffer.put(batch.readings, batch.rejected, source=source.name, position=batch.position)
                if self.stop_event.is_set():
                    break
        except Exception as exc:  # a broken source stops itself, never the gateway
            self.source_errors[source.name] = f"{type(exc).__name__}: {exc}"
            log.error("source %s stopped: %s", source.name, self.source_errors[source.name])
        else:
            log.info("source %s finished", source.name)

    def start(self) -> "Gateway":
        for source in self.sources:
            t = threading.Thread(target=self._read, args=(source,), name=f"source-{source.name}", daemon=True)
            t.start()
            self._source_threads.append(t)
        self._forwarder_thread = threading.Thread(
            target=self.forwarder.run, args=(self.stop_event,), name="forwarder", daemon=True
        )
        self._forwarder_thread.start()
        return self

    @property
    def sources_done(self) -> bool:
        return all(not t.is_alive() for t in self._source_threads)

    def idle(self) -> bool:
        """True once every source has finished and everything stored is acknowledged."""
        return self.sources_done and self.buffer.pending() == 0 and not self.forwarder.messages_in_flight

    def wait(self, *, until_idle: bool = False, timeout: float | None = None) -> bool:
        """Block until stopped (or, with ``until_idle``, until :meth:`idle`). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop_event.is_set():
            if until_idle and self.idle():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.stop_event.wait(0.2 if left is None else min(0.2, left))
        return True

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop cleanly: sources finish their current batch, in-flight PUBACKs are collected."""
        self.stop_event.set()
        self.forwarder.wake.set()
        for t in self._source_threads:
            t.join()
        if self._forwarder_thread is not None:
            self._forwarder_thread.join(drain_timeout_s + 5)
        self.publisher.close()
        if self.scorer is not None and hasattr(self.scorer, "close"):
            self.scorer.close()
        self.buffer.close()

    def status(self) -> dict:
        st = {**self.buffer.status(), "forwarder": self.forwarder.status(), "source_errors": self.source_errors}
        if self.scorer is not None and hasattr(self.scorer, "status"):
            st["scoring"] = self.scorer.status()
        return st
