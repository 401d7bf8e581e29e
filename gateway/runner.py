"""``gateway run``: sources → buffer → forwarder, wired from a :class:`~gateway.config.Config`.

One thread per source puts batches into the buffer (readings and source position in one
transaction); one thread forwards. Stopping (Ctrl-C, SIGTERM, or :meth:`Gateway.stop`) lets
each source finish the batch it is storing, gives the forwarder a moment to collect the
PUBACKs in flight, and closes the buffer. Anything not acknowledged stays in the buffer and is
sent on the next start: nothing is lost.

Stages and their health
-----------------------
Each thread is a *stage* (``forwarder``, ``source <name>``) with a state: ``running``,
``retrying`` (after an error, backing off), ``blocked`` (the forwarder, while the broker
refuses a topic: NOT_AUTHORIZED), ``finished`` (a source that came to its end), ``stopped`` (a
clean stop) or ``dead``. Every change is saved with :meth:`Buffer.save_health` as
``{"updated": ms, "stages": {name: {"state", "error", "since", "retries"}}}``, so ``gateway
status`` shows it from another process.

- **Transient** (:data:`TRANSIENT`): the buffer's BufferBusy ("database is locked" after the
  busy timeout), DiskFull and BufferFull (reject_newest backpressure), any other
  ``sqlite3.OperationalError``, :class:`~gateway.errors.RetryableError` and ``OSError`` (a
  device or a file that went away). The stage retries with exponential backoff and full jitter
  (1 s doubling to 30 s); a source starts again from its last committed position.
- **Dead**: transient errors that go on for ``dead_after_s`` (300 s, so about ten retries)
  without a success in between, or at once any other error (BufferCorrupt, SchemaError, a bug,
  a value json cannot encode). BufferFull never kills a source: waiting for room is its job.

A dead stage ends :meth:`Gateway.wait`; ``gateway run`` then stops cleanly and exits 1, so the
Greengrass nucleus restarts the component.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gateway.buffer import Buffer
from gateway.config import Config
from gateway.errors import BufferBusy, BufferFull, DiskFull, RetryableError
from gateway.forwarder import Backoff, Forwarder
from gateway.publishers import MemoryPublisher, Publisher
from gateway.sources import Source

log = logging.getLogger(__name__)


def build_source(spec: dict) -> Source:
    if spec["type"] == "replay":
        from gateway.sources.replay import ReplaySource

        return ReplaySource(spec["name"], spec["path"], speed=spec["speed"], batch_size=spec["batch_size"])
    if spec["type"] == "modbus":
        from gateway.sources.modbus import ModbusSource

        # config.validate loaded each device's register map; the Gateway hands the source its
        # Health (a meter that goes down shows as stage "meter <source>/<device>")
        return ModbusSource(spec["name"], spec["devices"], interval_s=spec["interval_s"], jitter_s=spec["jitter_s"],
                            max_spread_intervals=spec["max_spread_intervals"],
                            backoff_max_intervals=spec["backoff_max_intervals"])
    from gateway.sources.simulator import SimulatorSource

    # config.validate turned `start` (text, or a YAML timestamp) into epoch ms; None = now
    return SimulatorSource(
        spec["name"], meters=spec["meters"], seed=spec["seed"], interval_s=spec["interval_s"],
        speed=spec["speed"], anomaly_rate=spec["anomaly_rate"], count=spec["count"],
        labels_path=spec["labels_path"], start_ms=spec.get("start_ms"),
    )


def build_publisher(config: Config) -> Publisher:
    """The publisher of ``publisher:`` (the Gateway calls it only when it was given none)."""
    p = config.publisher
    if p["type"] == "memory":
        return MemoryPublisher()
    if p["type"] == "ipc":
        from gateway.publishers.ipc import IpcPublisher, receipt_topic

        # None: the publisher creates (and owns) a GreengrassCoreIPCClientV2. Its receipt window
        # goes into the forwarder's per-claim timeout (see gateway.publishers.ipc).
        return IpcPublisher(None, config.thing, delivery=p["delivery"], receipt_timeout_s=p["receipt_timeout_s"],
                            receipt_topic=receipt_topic(config.thing, config.app)).start()
    from gateway.publishers.mqtt import MqttPublisher

    # awscrt's operation timeout is the forwarder's ack_timeout_s; the forwarder's own per-claim
    # timeout is longer (see gateway.forwarder), so a lost publish fails in the client first.
    pub = MqttPublisher(p["endpoint"], config.thing, p["cert"], p["key"], p["ca"], port=p["port"], local=p["local"],
                        ack_timeout=config.forwarder["ack_timeout_s"], client_id=p.get("client_id"))
    return pub.start()


def build_scorer(config: Config, db_path: Any, *, weather: Any = None, watch_model: bool = True) -> Any:
    """The buffer's ingest scorer from ``model:`` and ``weather:``, or None when scoring is off.

    ``weather``: a :class:`~gateway.sources.weather.LatestWeather` fed from elsewhere (under
    Greengrass, from IoT Core messages); ``weather.path``, when configured, seeds it.
    ``watch_model=False``: the model folder is not polled (announcements swap the model).
    A model that fails its checks raises ModelError: the gateway does not start with it."""
    m = config.model
    if not m or not m.get("enabled", True):
        return None
    from gateway.model.drift import Drift
    from gateway.model.features import Buildings
    from gateway.model.online import MeterStats
    from gateway.model.scoring import ModelHolder, ReadingScorer

    holder = ModelHolder(m["path"], threads=m["threads"], check_every_s=2.0 if watch_model else None)
    max_age = 3 * 3600 * 1000
    if config.weather:
        from gateway.sources.weather import WeatherReplay

        replay = WeatherReplay(config.weather["path"])
        if weather is None:
            weather = replay.table(retain_ms=None)
        else:
            weather.update(replay.messages)
        max_age = config.weather["max_age_ms"]
    drift = Drift(m.get("drift_window_h", 24), m.get("drift_threshold", 2.5), m.get("drift_min_readings", 24))
    return ReadingScorer(holder, Buildings.from_csv(m["buildings"]), stats=MeterStats(threshold=m["threshold"]),
                         drift=drift,
                         save_every_s=m.get("save_every_s", 600),
                         weather=weather, weather_max_age_ms=max_age, db_path=db_path)


#: The settings a running gateway takes without a restart (:meth:`Gateway.apply_live`); a change
#: to any other key of :func:`settings` needs a new Gateway.
LIVE_KEYS = frozenset({
    "log_level", "forwarder.batch_size", "forwarder.claim_size", "forwarder.window",
    "forwarder.backoff_min_s", "forwarder.backoff_max_s", "forwarder.auth_retry_s", "forwarder.basic_ingest_rule",
    "model.path", "model.threshold", "model.save_every_s", "model.drift_threshold", "model.drift_min_readings",
    "weather.max_age_ms",
})


def settings(config: Config) -> dict[str, Any]:
    """A config as flat key paths (``forwarder.window``); ``sources`` is one value, and a section
    that is absent is one None."""
    out: dict[str, Any] = {"thing": config.thing, "app": config.app, "log_level": config.log_level,
                           "sources": config.sources}
    for name in ("buffer", "publisher", "forwarder", "model", "weather"):
        section = getattr(config, name)
        if section is None:
            out[name] = None
        else:
            out.update({f"{name}.{k}": v for k, v in section.items()})
    return out


def changed(old: Config, new: Config) -> set[str]:
    """The key paths of :func:`settings` whose values differ."""
    a, b = settings(old), settings(new)
    return {k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING)}


_MISSING = object()


TRANSIENT: tuple[type[BaseException], ...] = (
    BufferBusy, DiskFull, BufferFull, sqlite3.OperationalError, RetryableError, OSError,
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Health:
    """Every stage's state, saved in the buffer on each change (see the module doc)."""

    def __init__(self, buffer: Buffer, clock: Callable[[], float] = time.time):
        self.buffer = buffer
        self.clock = clock
        self._lock = threading.Lock()
        self._saving = threading.Lock()  # one save at a time, so an older record never lands last
        self._stages: dict[str, dict] = {}
        self._dirty = False
        self.changed = threading.Event()  # set whenever a stage changes state

    def set(self, stage: str, state: str, error: str | None = None, retries: int | None = None) -> None:
        with self._lock:
            old = self._stages.get(stage)
            if old is not None and old["state"] == state and old["error"] == error and retries is None:
                return
            self._stages[stage] = {
                "state": state, "error": error,
                "since": old["since"] if old is not None and old["state"] == state else int(self.clock() * 1000),
                "retries": retries if retries is not None else (old["retries"] if old else 0),
            }
            self._dirty = True
        self.changed.set()
        self.save()

    def save(self) -> None:
        """Write the stages to the buffer if they changed; a failure waits for the next try."""
        with self._saving:
            with self._lock:
                if not self._dirty:
                    return
                record = {"updated": int(self.clock() * 1000), "stages": {k: dict(v) for k, v in self._stages.items()}}
                self._dirty = False
            try:
                self.buffer.save_health(record)
            except Exception as exc:  # the buffer may be the very thing failing; the state is kept
                with self._lock:
                    self._dirty = True
                log.debug("could not save stage health: %s", _describe(exc))

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._stages.items()}

    def dead(self) -> dict[str, str]:
        """The dead stages and the error each died of."""
        with self._lock:
            return {k: v["error"] for k, v in self._stages.items() if v["state"] == "dead"}


class Stage:
    """One stage's retry policy (see the module doc) and its health.

    ``failed(exc)`` returns the delay before the next try, or None when the stage is dead.
    """

    def __init__(self, name: str, health: Health, *, dead_after_s: float = 300.0,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.health = health
        self.dead_after_s = dead_after_s
        self.backoff = backoff or Backoff(1.0, 30.0)
        self.clock = clock
        self.retries = 0  # in all
        self._streak = 0  # failures since the last success
        self._failing_since: float | None = None
        self._blocked: str | None = None
        health.set(name, "running")

    def ok(self) -> None:
        """The stage made progress: a run of failures, if any, is over."""
        if not self._streak:
            return
        log.info("%s: working again after %d %s", self.name, self._streak, "retry" if self._streak == 1 else "retries")
        self._streak = 0
        self._failing_since = None
        self.backoff.reset()
        self.health.set(self.name, "blocked" if self._blocked else "running", self._blocked, retries=self.retries)

    def failed(self, exc: BaseException) -> float | None:
        """The delay before the next try after ``exc``, or None: the stage is dead."""
        why = _describe(exc)
        now = self.clock()
        if not isinstance(exc, TRANSIENT):
            log.error("%s is dead: %s", self.name, why, exc_info=exc)
            self.health.set(self.name, "dead", why, retries=self.retries)
            return None
        if not isinstance(exc, BufferFull):  # backpressure: waiting for room is never a reason to die
            if self._failing_since is None:
                self._failing_since = now
            elif now - self._failing_since >= self.dead_after_s:
                log.error("%s is dead: %s, still, after %d retries in %.0f s", self.name, why, self._streak,
                          now - self._failing_since)
                self.health.set(self.name, "dead", why, retries=self.retries)
                return None
        delay = self.backoff.next()
        # Like a meter that stops answering: once at WARNING, then quietly until it recovers.
        log.log(logging.WARNING if not self._streak else logging.DEBUG,
                "%s: %s; retrying in %.1f s", self.name, why, delay)
        self._streak += 1
        self.retries += 1
        self.health.set(self.name, "retrying", why, retries=self.retries)
        return delay

    def blocked(self, reason: str | None) -> None:
        """The forwarder's policy refusal began (``reason``) or cleared (None)."""
        self._blocked = reason
        self.health.set(self.name, "blocked" if reason else "running", reason, retries=self.retries)

    def end(self, state: str) -> None:
        """``finished`` or ``stopped``, unless the stage is dead or finished already."""
        if self.health.snapshot().get(self.name, {}).get("state") not in ("dead", "finished"):
            self.health.set(self.name, state, None, retries=self.retries)


class Gateway:
    """The running gateway. ``publisher``, ``sources`` and ``scorer`` may be injected (tests);
    ``dead_after_s`` and ``stage_backoff`` set the stages' retry policy (see the module doc);
    ``auth_retry_s`` and ``basic_ingest_rule`` go to the :class:`~gateway.forwarder.Forwarder`."""

    def __init__(self, config: Config, *, publisher: Publisher | None = None,
                 sources: list[Source] | None = None, scorer: Any = None,
                 dead_after_s: float = 300.0, stage_backoff: Callable[[], Backoff] | None = None,
                 auth_retry_s: float | None = None, basic_ingest_rule: str | None = None,
                 weather: Any = None, watch_model: bool = True):
        self.config = config
        b = config.buffer
        self.buffer = Buffer(b["path"], budget_bytes=b["budget_bytes"], policy=b["policy"],
                             live_window_ms=b["live_window_ms"], synchronous=b["synchronous"])
        self.sources = sources if sources is not None else [build_source(s) for s in config.sources]
        if scorer is None:
            try:
                scorer = build_scorer(config, b["path"], weather=weather, watch_model=watch_model)
            except Exception:
                self.buffer.close()
                raise
        self.scorer = scorer
        self.buffer.scorer = scorer  # readings are scored as they are stored
        self.publisher = publisher if publisher is not None else build_publisher(config)
        f = config.forwarder
        self.forwarder = Forwarder(
            self.buffer, self.publisher, config.thing, app=config.app, batch_size=f["batch_size"],
            claim_size=f["claim_size"], window=f["window"], ack_timeout_s=f["ack_timeout_s"],
            auth_retry_s=auth_retry_s if auth_retry_s is not None else f.get("auth_retry_s", 300.0),
            basic_ingest_rule=basic_ingest_rule or f.get("basic_ingest_rule"),
            backoff=Backoff(f["backoff_min_s"], f["backoff_max_s"]),
        )
        self.stop_event = threading.Event()
        self.health = Health(self.buffer)
        self.dead_after_s = dead_after_s
        self.stage_backoff = stage_backoff or (lambda: Backoff(1.0, 30.0))
        self._stages: list[Stage] = []
        self._source_threads: list[threading.Thread] = []
        self._forwarder_thread: threading.Thread | None = None
        self._held = False

    # ------------------------------------------------------------------ threads

    def _stage(self, name: str) -> Stage:
        stage = Stage(name, self.health, dead_after_s=self.dead_after_s, backoff=self.stage_backoff())
        self._stages.append(stage)
        return stage

    def _read(self, source: Source, stage: Stage) -> None:
        """Put the source's batches until it ends, it dies, or the gateway stops; after an
        error, start again from the last committed position."""
        while not self.stop_event.is_set():
            try:
                position = self.buffer.position(source.name)
                log.info("source %s starts at position %r", source.name, position)
                for batch in source.batches(position, self.stop_event):
                    self.buffer.put(batch.readings, batch.rejected, source=source.name, position=batch.position,
                                    can_wait=getattr(source, "can_wait", True))
                    stage.ok()
                    if self.stop_event.is_set():
                        break
            except Exception as exc:
                delay = stage.failed(exc)
                if delay is None:
                    return
                self.stop_event.wait(delay)
                continue
            if not self.stop_event.is_set():
                log.info("source %s finished", source.name)
                stage.end("finished")
            return

    def start(self) -> "Gateway":
        for source in self.sources:
            if hasattr(source, "health") and getattr(source, "health") is None:
                source.health = self.health  # a source with parts of its own (meters) reports them here
            stage = self._stage(f"source {source.name}")
            t = threading.Thread(target=self._read, args=(source, stage), name=f"source-{source.name}", daemon=True)
            t.start()
            self._source_threads.append(t)
        self._forwarder_thread = threading.Thread(
            target=self.forwarder.run, args=(self.stop_event,), kwargs={"stage": self._stage("forwarder")},
            name="forwarder", daemon=True,
        )
        self._forwarder_thread.start()
        return self

    @property
    def sources_done(self) -> bool:
        return all(not t.is_alive() for t in self._source_threads)

    def idle(self) -> bool:
        """True once every source has finished and everything stored is acknowledged."""
        return self.sources_done and self.buffer.pending() == 0 and not self.forwarder.messages_in_flight

    def dead(self) -> dict[str, str]:
        """The stages that died, with their errors (``gateway run`` exits 1 when any did)."""
        return self.health.dead()

    def wait(self, *, until_idle: bool = False, timeout: float | None = None) -> bool:
        """Block until stopped, until a stage is dead, or (with ``until_idle``) until
        :meth:`idle`. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop_event.is_set() and not self.dead():
            if until_idle and self.idle():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.health.save()  # retries a save that failed
            self.health.changed.wait(0.2 if left is None else min(0.2, left))
            self.health.changed.clear()
        return True

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop cleanly: sources finish their current batch, in-flight PUBACKs are collected."""
        self.stop_event.set()
        self.forwarder.wake.set()
        for t in self._source_threads:
            t.join()
        if self._forwarder_thread is not None:
            self._forwarder_thread.join(drain_timeout_s + 5)
        for stage in self._stages:
            stage.end("stopped")
        self.health.save()
        self.publisher.close()
        if self.scorer is not None and hasattr(self.scorer, "close"):
            self.scorer.close()
        self.buffer.close()

    # ------------------------------------------------------------------ live control

    def apply_live(self, config: Config) -> list[str]:
        """Take the :data:`LIVE_KEYS` of ``config`` that changed; return them, sorted. The caller
        checks first that nothing else changed (:func:`changed`): the rest needs a new Gateway."""
        keys = sorted(changed(self.config, config) & LIVE_KEYS)
        f, fwd = config.forwarder, self.forwarder
        logging.getLogger().setLevel(config.log_level)
        fwd.batch_size, fwd.claim_size = f["batch_size"], f["claim_size"]
        fwd.auth_retry_s, fwd.basic_ingest_rule = f["auth_retry_s"], f.get("basic_ingest_rule")
        fwd.backoff.base_s, fwd.backoff.cap_s = f["backoff_min_s"], f["backoff_max_s"]
        self.config = config
        self.hold(self._held)  # the window, unless claims are held
        scorer = self.scorer
        if scorer is not None and config.model:
            scorer.stats.threshold = config.model["threshold"]
            scorer.save_every_s = config.model["save_every_s"]
            scorer.drift.threshold = config.model["drift_threshold"]
            scorer.drift.min_readings = config.model["drift_min_readings"]
            if config.weather:
                scorer.weather_max_age_ms = config.weather["max_age_ms"]
            if "model.path" in keys and Path(config.model["path"]) != scorer.holder.path:
                scorer.holder.swap(config.model["path"])
        return keys

    def hold(self, on: bool = True) -> None:
        """Stop claiming new work (``on``) or claim again; what is in flight settles meanwhile."""
        self._held = on
        fwd = self.forwarder
        window = self.config.forwarder["window"]
        fwd.window = 0 if on else window
        fwd.claim_timeout_s = fwd.claim_timeout(window)  # the publisher's delivery window (receipts) included

    def in_flight(self) -> int:
        """Messages published and not yet acknowledged (read from another thread)."""
        for _ in range(10):
            try:
                return self.forwarder.messages_in_flight
            except RuntimeError:  # the forwarder thread changed its table mid-count
                continue
        return self.forwarder.messages_in_flight

    def status(self) -> dict:
        st = {**self.buffer.status(), "forwarder": self.forwarder.status(), "stages": self.health.snapshot()}
        if self.scorer is not None and hasattr(self.scorer, "status"):
            st["scoring"] = self.scorer.status()
        return st
