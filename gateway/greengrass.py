"""The Greengrass agent: the gateway (:class:`gateway.runner.Gateway`) run as the component
``org.metergateway.Gateway``, everything it needs from the nucleus over IPC.

All IPC goes through one injected ``GreengrassCoreIPCClientV2`` (public methods only), so the
agent runs the same against a real nucleus, a local one, or an autospec'd client in tests.

**Configuration.** The component configuration has the YAML config's keys (``thing``, ``app``,
``buffer``, ``sources``, ``publisher``, ``forwarder``, ``model``, ``weather``) plus
``accessControl`` (dropped: it is the nucleus's) and an optional ``greengrass`` section
(:data:`GREENGRASS_DEFAULTS`). An empty ``thing`` is the core device's, from
``AWS_IOT_THING_NAME``. Relative paths are relative to the component's work folder. It is read
with ``get_configuration`` and checked by :func:`gateway.config.validate`; a bad configuration
never starts the gateway: the agent reports ERRORED and exits 1 with the validator's message.
A proposed update is checked the same way before the nucleus applies it
(``subscribe_to_validate_configuration_updates``), and REJECTED with the validator's message, so
a bad deployment fails in the cloud with its reason.

**Applying an update.** Keys in :data:`gateway.runner.LIVE_KEYS` and the ``greengrass`` section
apply to the running gateway; a change to any other key stops the gateway cleanly (what is not
acknowledged stays in the buffer) and starts a new one on the same buffer: nothing is lost.

**Lifecycle.** RUNNING once the gateway runs; ERRORED when a stage dies or it cannot start (the
agent then exits 1 and the nucleus restarts the component). Before a deployment updates the
component (``PreComponentUpdateEvent``) the agent stops claiming new work; while messages still
await their PUBACK it defers the update (``defer_component_update``, checked again after
``defer_recheck_s``), then lets it go with ``recheck_after_ms=0`` (the nucleus goes on at once
instead of waiting out its update timeout): SIGTERM stops the gateway cleanly. Claims resume after the
``PostComponentUpdateEvent``, or :attr:`GreengrassAgent.hold_s` after the last notice.

**Weather** arrives from IoT Core on ``dt/weather/+/observations`` (format:
:mod:`gateway.sources.weather`) into the table the scorer reads; a bad message is logged with its
reason, counted and dropped. **Health** goes to ``dt/<app>/gateway/<thing>/health`` every
``health_every_s`` (:meth:`GreengrassAgent.health`). **The model** is swapped live when the model
component announces a new one (:mod:`gateway.model.announce`); the gateway asks for an
announcement as it starts.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gateway.config import Config, _Checker, in_greengrass, positive, validate
from gateway.errors import ConfigError, ConfigErrors
from gateway.model import announce
from gateway.publishers import Publisher
from gateway.runner import LIVE_KEYS, Gateway, build_publisher, changed
from gateway.sources.weather import LatestWeather, parse_observations

log = logging.getLogger(__name__)

COMPONENT = "org.metergateway.Gateway"
WEATHER_TOPIC = "dt/weather/+/observations"
#: The ``greengrass`` section of the component configuration; every key applies live.
GREENGRASS_DEFAULTS: dict[str, Any] = {
    "health_every_s": 60.0,   # health message period
    "weather_topic": WEATHER_TOPIC,  # the IoT Core subscription feeding the weather table
    "model_wait_s": 30.0,     # with model: and no model.path, wait this long for an announcement
    "defer_recheck_s": 10.0,  # a deferred update is offered again after this long
}
MAX_S = 86_400


def health_topic(app: str, thing: str) -> str:
    """``dt/<app>/gateway/<thing>/health``."""
    return f"dt/{app}/gateway/{thing}/health"


@dataclass
class Settings:
    """A component configuration, checked: the gateway's Config and the ``greengrass`` section."""

    config: Config
    greengrass: dict = field(default_factory=lambda: dict(GREENGRASS_DEFAULTS))


def _ints(value: Any) -> Any:
    """Integral floats as ints, all the way down (the nucleus may hand 8883 back as 8883.0;
    the validator takes an int wherever it takes a number)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def read_settings(raw: Any, base: Path, *, env: dict | None = None, model_path: str | Path | None = None,
                  model_wait_s: float | None = None) -> Settings:
    """Check a component configuration; raise ConfigErrors naming every problem.

    ``model_path``: the model in use or announced, which stands for ``model.path`` under
    Greengrass (every model version lives at a new path). ``model_wait_s``: how long the agent
    waited for an announcement, when none came (it names that in the error)."""
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError("top level", f"{raw!r} must be a mapping")])
    raw = _ints({k: v for k, v in raw.items() if k != "accessControl"})
    c = _Checker(base)
    gg_raw = raw.pop("greengrass", None)
    g = c.mapping("greengrass", gg_raw, set(GREENGRASS_DEFAULTS))
    gg = {
        "health_every_s": c.get("greengrass", g, "health_every_s", (int, float), 60.0, check=positive(MAX_S)),
        "weather_topic": c.get("greengrass", g, "weather_topic", str, WEATHER_TOPIC,
                               check=lambda v: None if v else "must not be empty"),
        "model_wait_s": c.get("greengrass", g, "model_wait_s", (int, float), 30.0, check=positive(MAX_S)),
        "defer_recheck_s": c.get("greengrass", g, "defer_recheck_s", (int, float), 10.0, check=positive(MAX_S)),
    }
    if not raw.get("thing"):
        thing = env.get("AWS_IOT_THING_NAME", "")
        if thing:
            raw["thing"] = thing
        else:
            c.fail("thing", "is empty, and AWS_IOT_THING_NAME is not set (the nucleus sets it for a component)")
            raw["thing"] = "unset"  # reported above; keeps the validator's message about the rest
    m = raw.get("model")
    if isinstance(m, dict):
        if model_path is not None:
            raw["model"] = {**m, "path": str(model_path)}
        elif "path" not in m and model_wait_s is not None:
            c.fail("model.path", f"is not set, and {announce.COMPONENT} announced no model on "
                                 f"{announce.ANNOUNCE_TOPIC} within {model_wait_s:g} s")
            raw["model"] = {k: v for k, v in m.items()}
    try:
        config = validate(raw, base=base, greengrass=in_greengrass())
    except ConfigErrors as exc:
        errors = [e for e in exc.errors if not (e.path == "model.path" and any(x.path == "model.path"
                                                                                 for x in c.errors))]
        raise ConfigErrors(c.errors + errors) from None
    if c.errors:
        raise ConfigErrors(c.errors)
    return Settings(config, gg)


def ipc_publisher(ipc) -> Callable[[Config], Publisher]:
    """The publisher for a config: ``publisher.type: ipc`` publishes through the nucleus on the
    agent's own client (:class:`gateway.publishers.ipc.IpcPublisher`); mqtt and memory as
    ``gateway run`` builds them."""

    def make(config: Config) -> Publisher:
        p = config.publisher
        if p.get("type") == "ipc":
            from gateway.publishers.ipc import IpcPublisher, receipt_topic

            return IpcPublisher(ipc, config.thing, delivery=p["delivery"], receipt_timeout_s=p["receipt_timeout_s"],
                                receipt_topic=receipt_topic(config.thing, config.app)).start()
        return build_publisher(config)

    return make


def _states():
    from awsiot.greengrasscoreipc.model import ReportedLifecycleState

    return ReportedLifecycleState


class GreengrassAgent:
    """Runs a :class:`Gateway` under Greengrass (see the module doc).

    ``ipc``: a ``GreengrassCoreIPCClientV2``. ``publisher_factory(config)``: the gateway's
    publisher (default :func:`ipc_publisher`). ``make_gateway(config, publisher=, weather=,
    watch_model=)``: builds the Gateway (tests add sources). ``work_dir``: what relative paths
    are relative to (the component's work folder, the current directory under Greengrass).
    """

    def __init__(self, ipc, *, publisher_factory: Callable[[Config], Publisher] | None = None,
                 make_gateway: Callable[..., Gateway] | None = None, work_dir: str | Path | None = None,
                 env: dict | None = None, hold_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.ipc = ipc
        self.publisher_factory = publisher_factory or ipc_publisher(ipc)
        self.make_gateway = make_gateway or Gateway
        self.work_dir = Path(work_dir) if work_dir is not None else Path.cwd()
        self.env = os.environ if env is None else env
        self.hold_s = hold_s
        self.clock = clock
        self.weather = LatestWeather()
        self.weather_counts = {"received": 0, "used": 0, "rejected": 0, "last_error": None}
        self.settings: Settings | None = None
        self.gateway: Gateway | None = None
        self.announced: announce.Announcement | None = None
        self.model_path: Path | None = None  # the model in use (verified), which restarts keep
        self.restarts = 0
        self.updates: list[dict] = []  # per applied update: {"restart": keys, "live": keys}
        self.deferrals = 0
        self.actions_done = 0  # what the loop has done of what the streams asked (tests wait on it)
        self.stop_event = threading.Event()
        self.running = threading.Event()
        self.changed = threading.Condition()  # notified after each action the loop has done
        self._actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._announced = threading.Event()
        self._streams: list[Any] = []
        self._weather_stream: Any = None
        self._hold_until: float | None = None
        self._started_at = clock()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ configuration

    def read(self, raw: Any, *, waited: float | None = None) -> Settings:
        """Check a component configuration as the agent would run it (see :func:`read_settings`)."""
        return read_settings(raw, self.work_dir, env=self.env, model_path=self._model_override(),
                             model_wait_s=waited)

    def _model_override(self) -> Path | str | None:
        if self.model_path is not None:
            return self.model_path
        return self.announced.path if self.announced is not None else None

    def _get_configuration(self) -> Any:
        return self.ipc.get_configuration(key_path=[]).value

    def _load(self) -> Settings:
        raw = self._get_configuration()
        m = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(m, dict) and "path" not in m and m.get("enabled", True) is not False and self.announced is None:
            wait = _number((raw.get("greengrass") or {}).get("model_wait_s"), GREENGRASS_DEFAULTS["model_wait_s"])
            log.info("waiting up to %g s for %s to announce its model", wait, announce.COMPONENT)
            if not self._announced.wait(wait):
                return self.read(raw, waited=wait)
        return self.read(raw)

    def _on_validate(self, event: Any) -> None:
        """A proposed configuration: ACCEPTED, or REJECTED with the validator's message."""
        from awsiot.greengrasscoreipc.model import ConfigurationValidityReport, ConfigurationValidityStatus

        e = event.validate_configuration_update_event
        if e is None:
            return
        try:
            self.read(e.configuration)
        except ConfigErrors as exc:
            status, message = ConfigurationValidityStatus.REJECTED, str(exc)
            log.error("configuration of deployment %s rejected:\n%s", e.deployment_id, message)
        else:
            status, message = ConfigurationValidityStatus.ACCEPTED, "the gateway accepts this configuration"
        self.ipc.send_configuration_validity_report(configuration_validity_report=ConfigurationValidityReport(
            status=status, deployment_id=e.deployment_id, message=message))

    def _on_config_update(self, event: Any) -> None:
        if event.configuration_update_event is not None:
            self._actions.put(self._reconfigure)

    def _reconfigure(self) -> None:
        """Re-read the configuration; apply it live, or by a clean restart (see the module doc)."""
        try:
            new = self._load()
        except ConfigErrors as exc:  # a local deployment is not validated first: keep running as is
            log.error("configuration update refused, the gateway keeps its configuration:\n%s", exc)
            return
        old = self.settings
        assert old is not None and self.gateway is not None
        keys = changed(old.config, new.config)
        gg_keys = sorted(f"greengrass.{k}" for k in new.greengrass if new.greengrass[k] != old.greengrass.get(k))
        if not keys and not gg_keys:
            return
        if keys - LIVE_KEYS:
            log.warning("configuration changed (%s): restarting the gateway", ", ".join(sorted(keys)))
            self._restart(new)
            record = {"restart": sorted(keys), "live": gg_keys}
        else:
            applied = self.gateway.apply_live(new.config) if keys else []
            self._note_model()
            record = {"restart": [], "live": applied + gg_keys}
            log.warning("configuration applied live: %s", ", ".join(record["live"]))
        self.settings = Settings(self.settings.config if self.settings else new.config, new.greengrass)
        self._apply_greengrass(new.greengrass, old.greengrass)
        self.updates.append(record)

    def _apply_greengrass(self, new: dict, old: dict) -> None:
        if new["weather_topic"] != old.get("weather_topic"):
            _close(self._weather_stream)
            self._subscribe_weather(new["weather_topic"])
        if new["health_every_s"] != old.get("health_every_s"):
            self._next_health = self.clock()

    # ------------------------------------------------------------------ the gateway

    def _start(self, settings: Settings) -> None:
        publisher = self.publisher_factory(settings.config)
        try:
            gw = self.make_gateway(settings.config, publisher=publisher, weather=self.weather, watch_model=False)
        except Exception:
            publisher.close()
            raise
        logging.getLogger().setLevel(settings.config.log_level)
        self.gateway = gw.start()
        self.settings = settings
        self._note_model()
        self._hold_until = None

    def _restart(self, new: Settings) -> None:
        """Stop the gateway cleanly and start one with ``new``; should that fail, the old one again."""
        old = self.settings
        assert old is not None and self.gateway is not None
        self.gateway.stop()
        self.gateway = None
        self.restarts += 1
        try:
            self._start(new)
        except Exception as exc:
            log.error("the gateway cannot start with the new configuration (%s: %s); starting it again "
                      "with the previous one", type(exc).__name__, exc)
            self._start(old)

    def _note_model(self) -> None:
        holder = self._holder()
        if holder is not None:
            self.model_path = holder.path

    def _holder(self):
        scorer = self.gateway.scorer if self.gateway is not None else None
        return getattr(scorer, "holder", None)

    # ------------------------------------------------------------------ the model

    def _on_announce(self, event: Any) -> None:
        a = announce.parse(announce.message_payload(event))
        if isinstance(a, str):
            log.warning("model announcement ignored: %s", a)
            return
        self.announced = a
        self._announced.set()
        self._actions.put(lambda: self._swap(a))

    def _swap(self, a: announce.Announcement) -> None:
        holder = self._holder()
        if holder is None:
            log.info("model %s announced; scoring is off", a.model)
            return
        if Path(a.path) == holder.path:
            return
        if holder.swap(a.path):
            self.model_path = holder.path
        # refused: the holder keeps the old model and says why (status, health)

    # ------------------------------------------------------------------ weather

    def _on_weather(self, event: Any) -> None:
        msg = event.message
        topic, payload = msg.topic_name, msg.payload or b""
        good, bad = parse_observations(topic, payload)
        used = self.weather.update(good) if good else 0
        with self._lock:
            c = self.weather_counts
            c["received"] += 1
            c["used"] += used
            c["rejected"] += len(bad)
            if bad:
                c["last_error"] = f"{topic}: {bad[0]}"
        for reason in bad:
            log.warning("weather message on %s dropped: %s", topic, reason)

    def _subscribe_weather(self, topic: str) -> None:
        from awsiot.greengrasscoreipc.model import QOS

        try:
            self._weather_stream = self.ipc.subscribe_to_iot_core(
                topic_name=topic, qos=QOS.AT_LEAST_ONCE, on_stream_event=self._on_weather,
                on_stream_error=_keep_open("weather"))
        except Exception as exc:  # weather is optional: scores use NaN weather features without it
            log.error("cannot subscribe to %s (check the component's accessControl): %s: %s",
                      topic, type(exc).__name__, exc)
            self._weather_stream = None

    # ------------------------------------------------------------------ component updates

    def _on_component_update(self, event: Any) -> None:
        if event.pre_update_event is not None:
            self._actions.put(lambda: self._pre_update(event.pre_update_event.deployment_id))
        elif event.post_update_event is not None:
            self._actions.put(self._post_update)

    def _pre_update(self, deployment_id: str | None) -> None:
        gw = self.gateway
        if gw is None:
            return
        gw.hold(True)
        self._hold_until = self.clock() + self.hold_s
        n = gw.in_flight()
        if not n:  # recheck_after_ms=0 tells the nucleus it may go now, instead of waiting out its timeout
            log.info("deployment %s: nothing in flight, the component may be updated", deployment_id)
            self.ipc.defer_component_update(deployment_id=deployment_id, recheck_after_ms=0,
                                            message="nothing in flight: ready for the update")
            return
        assert self.settings is not None
        recheck = self.settings.greengrass["defer_recheck_s"]
        message = f"{n} messages await their PUBACK; the gateway holds new work and finishes them first"
        log.warning("deployment %s deferred %g s: %s", deployment_id, recheck, message)
        self.ipc.defer_component_update(deployment_id=deployment_id, recheck_after_ms=int(recheck * 1000),
                                        message=message)
        self.deferrals += 1

    def _post_update(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if self.gateway is not None and self._hold_until is not None:
            log.info("forwarding resumes")
            self.gateway.hold(False)
        self._hold_until = None

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        """The health message: buffer depth and age, rates, evictions, autonomy, forwarder,
        stages, model, drift of the model alone (:mod:`gateway.model.drift`), weather (see the
        README)."""
        gw, s = self.gateway, self.settings
        assert gw is not None and s is not None
        st: dict = {}
        for _ in range(10):
            try:
                st = gw.status()
                break
            except RuntimeError:  # the forwarder thread changed its table mid-read
                continue
        buffer = {k: v for k, v in st.items() if k not in ("forwarder", "stages", "scoring", "health", "path")}
        scoring = st.get("scoring")
        with self._lock:
            weather = {**self.weather_counts, "sites": len(self.weather.sites()), "topic": s.greengrass["weather_topic"]}
        return {
            "thing": s.config.thing,
            "component": COMPONENT,
            "ts": int(time.time() * 1000),
            "uptime_s": round(self.clock() - self._started_at, 1),
            "state": "held" if self._hold_until is not None else "running",
            "restarts": self.restarts,
            "buffer": buffer,
            "forwarder": st.get("forwarder"),
            "stages": st.get("stages"),
            "model": None if scoring is None else {
                **scoring["model"], "announced": self.announced.payload() if self.announced else None,
                "scored": scoring["scored"], "flagged": scoring["flagged"], "unscored": scoring["unscored"]},
            "drift": None if scoring is None else scoring.get("drift"),
            "weather": weather,
        }

    def publish_health(self) -> None:
        s, gw = self.settings, self.gateway
        assert s is not None and gw is not None
        topic = health_topic(s.config.app, s.config.thing)
        payload = json.dumps(self.health(), separators=(",", ":"), default=str).encode()
        try:
            fut = gw.publisher.publish(topic, payload, 1)
        except Exception as exc:
            log.warning("health not published: %s: %s", type(exc).__name__, exc)
            return
        fut.add_done_callback(lambda f: f.exception() and log.debug("health not delivered: %s", f.exception()))

    # ------------------------------------------------------------------ running

    def _report(self, state: str) -> None:
        try:
            self.ipc.update_state(state=state)
        except Exception as exc:
            log.error("cannot report %s to the nucleus: %s: %s", state, type(exc).__name__, exc)

    def _subscribe(self) -> None:
        ipc = self.ipc
        self._streams.append(ipc.subscribe_to_validate_configuration_updates(
            on_stream_event=self._on_validate, on_stream_error=_keep_open("configuration validation")))
        self._streams.append(ipc.subscribe_to_configuration_update(
            key_path=[], on_stream_event=self._on_config_update, on_stream_error=_keep_open("configuration")))
        self._streams.append(ipc.subscribe_to_component_updates(
            on_stream_event=self._on_component_update, on_stream_error=_keep_open("component updates")))
        try:
            self._streams.append(ipc.subscribe_to_topic(
                topic=announce.ANNOUNCE_TOPIC, on_stream_event=self._on_announce,
                on_stream_error=_keep_open("model announcements")))
            announce.request(ipc)
        except Exception as exc:  # the model keeps what config names; no hot swap
            log.error("cannot subscribe to %s (check the component's accessControl): %s: %s",
                      announce.ANNOUNCE_TOPIC, type(exc).__name__, exc)

    def run(self) -> int:
        """Start, run until :meth:`stop` (0) or until the gateway dies or cannot start (1)."""
        states = _states()
        try:
            self._subscribe()
            settings = self._load()
            self._subscribe_weather(settings.greengrass["weather_topic"])
            self._start(settings)
        except ConfigErrors as exc:
            log.error("the configuration is not valid; the gateway does not start:\n%s", exc)
            self._report(states.ERRORED)
            self._close()
            return 1
        except Exception as exc:
            log.error("the gateway cannot start: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._report(states.ERRORED)
            self._close()
            return 1
        self._report(states.RUNNING)
        self.running.set()
        try:
            return self._loop()
        finally:
            if self.gateway is not None:
                self.gateway.stop()
                self.gateway = None
            self._close()
            self.running.clear()
            with self.changed:
                self.changed.notify_all()

    def _loop(self) -> int:
        states = _states()
        self._next_health = self.clock()
        while not self.stop_event.is_set():
            assert self.settings is not None and self.gateway is not None
            wait = max(0.0, min(0.2, self._next_health - self.clock()))
            try:
                action = self._actions.get(timeout=wait)
            except queue.Empty:
                action = None
            if action is not None:
                try:
                    action()
                except Exception as exc:
                    log.error("the gateway failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                    self._report(states.ERRORED)
                    return 1
                self.actions_done += 1
                with self.changed:
                    self.changed.notify_all()
            if self.gateway is None:
                self._report(states.ERRORED)
                return 1
            dead = self.gateway.dead()
            if dead:
                log.error("the gateway stopped: %s", "; ".join(f"{k}: {v}" for k, v in dead.items()))
                self._report(states.ERRORED)
                return 1
            now = self.clock()
            if self._hold_until is not None and now >= self._hold_until:
                self._resume()
            if now >= self._next_health:
                self._next_health = now + self.settings.greengrass["health_every_s"]
                self.publish_health()
            self.gateway.health.save()
        return 0

    def stop(self) -> None:
        """Stop cleanly (SIGTERM): the loop ends, the gateway stops, the streams close."""
        self.stop_event.set()

    def _close(self) -> None:
        for stream in self._streams + [self._weather_stream]:
            _close(stream)
        self._streams, self._weather_stream = [], None

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` holds after one of the loop's actions (tests)."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def _keep_open(what: str) -> Callable[[Exception], bool]:
    def on_error(exc: Exception) -> bool:
        log.warning("%s stream error: %s: %s", what, type(exc).__name__, exc)
        return False  # keep the stream open

    return on_error


def _close(result: Any) -> None:
    """Close a subscription's operation (the second of what ``subscribe_to_*`` returns)."""
    if isinstance(result, tuple) and len(result) == 2:
        try:
            result[1].close()
        except Exception as exc:  # closing while the nucleus goes away
            log.debug("closing a stream: %s", exc)


def serve(agent: GreengrassAgent) -> int:
    """Run ``agent`` with SIGTERM and SIGINT stopping it cleanly; its exit code."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run()
