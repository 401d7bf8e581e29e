"""The gateway's YAML configuration, validated before anything starts.

Every error names the key path, the bad value and what is allowed::

    sources[1].speed: -3 must be > 0
    buffer.policy: 'drop_newest' is not one of drop_oldest, reject_newest
    publisher.cert: /etc/gw/cert.pem does not exist

All problems are collected in one pass and raised together as
:class:`~gateway.errors.ConfigErrors`; a bad config never starts the gateway. The same
:func:`validate` checks a Greengrass configuration update before it is applied: it is a pure
function of the dict, plus checks of the paths it names (they exist as the right kind of file,
a file the gateway writes can be created) that create nothing. What needs a file's content
(certificates, the model, the weather, the buffer's schema) is :mod:`gateway.preflight`'s.

A config file must be a regular file of at most 1 MiB, nested at most 32 deep; a key given twice
in one mapping is refused (PyYAML would keep the last one silently). Numbers must be finite
(``.inf`` and ``.nan`` are refused). A file the gateway writes (the buffer, a labels CSV) must not
be under /proc or /sys, nor any other key's file.

Reference (defaults in brackets)::

    thing: gw-demo-01               # thing name = MQTT client id; a topic level
    app: meters                     # [meters] the <app> level of dt/<app>/<site>/<thing>/raw
    log_level: INFO                 # [INFO] DEBUG, INFO, WARNING, ERROR
    buffer:
      path: var/buffer.db           # [var/buffer.db] relative paths are relative to the config file
      budget_mb: 1024               # [1024] byte budget of the SQLite file, 1..1048576
      policy: drop_oldest           # [drop_oldest] or reject_newest, when the budget is used
      live_window_s: 300            # [300] readings newer than this (data time) go first; <= 365 days
      synchronous: full             # [full] fsync every put; "normal" trades power-loss safety for speed
    sources:                        # one or more
      - type: replay                # ASHRAE CSV / CSV.GZ, or a JSON array of messages
        name: sample                # [the type] unique; keys the committed position
        path: data/sample/readings.csv.gz
        speed: null                 # [null] null = as fast as possible; 3600 = an hour a second
        batch_size: 1000            # [1000]
      - type: simulator
        name: sim
        meters: 2380                # [2380]
        interval_s: 60              # [60] 1..86400, a whole number of ms
        speed: 1.0                  # [1.0] null = as fast as possible
        anomaly_rate: 0.0           # [0.0] share of readings turned into spikes or dropouts
        seed: 1                     # [1] 0..4294967295
        start: null                 # [null = now] ISO 8601 time of the first tick, 2000-01-01 or later;
                                    #   no offset = UTC; an unquoted YAML timestamp or date works too
        count: null                 # [null] stop after this many ticks
        labels_path: null           # [null] where injected anomalies are recorded (CSV)
      - type: modbus                # real meters (gateway.sources.modbus)
        name: site-a
        interval_s: 60              # [60] poll at every boundary of this (by the wall clock), 1..86400
        jitter_s: 0                 # [0] spread each meter's poll over this many s after the boundary
        timeout_s: 1.0              # [1.0] default for the devices: per request, 0.05..60
        retries: 1                  # [1] default for the devices: extra tries of a request, 0..10
        max_spread_intervals: 60    # [60] a longer gap's energy is quarantined, not spread
        backoff_max_intervals: 16   # [16] a dead meter is tried at least every this many intervals
        devices:                    # and/or devices_csv: site-a.csv (one device a row, columns = keys)
          - name: main              # [<host or serial>#<unit_id>] unique in the source; keys its counter
            map: eastron-sdm630     # a shipped map (eastron-sdm630, schneider-iem3000,
                                    #   carlo-gavazzi-em24) or a map file's path
            transport: tcp          # [tcp with host, rtu with serial] tcp, rtu-over-tcp or rtu
            host: 10.0.0.21         # tcp / rtu-over-tcp
            port: 502               # [502]
            serial: null            # rtu: /dev/ttyUSB0; with baudrate [9600], parity [N] (N, E, O),
                                    #   stopbits [1], bytesize [8]
            unit_id: 1              # 1..247
            site: "0"               # the reading's site, building and meter type
            building: "12"
            meter: electricity      # [electricity] electricity, chilledwater, steam, hotwater
            max_power_kw: 250       # [null] a delta above this × the interval is quarantined
            energy: null            # [the map's first energy register] the counter to read
            registers: null         # [all of the map's] which registers to read (coalesced)
            timeout_s: 1.0          # [the source's]
            retries: 1              # [the source's]
    publisher:
      type: mqtt                    # mqtt, ipc or memory
      endpoint: localhost           # IoT Core ATS endpoint, or a local broker
      port: 8883                    # [8883]
      cert: certs/gw.crt            # client certificate (CN = thing name)
      key: certs/gw.key
      ca: certs/ca.crt
      local: false                  # [false] true lifts IoT Core's 100 publishes/s and 512 KB/s
      client_id: null               # [null = the thing name] the MQTT client id; inside Greengrass it
                                    #   must differ from the thing name (the nucleus connects as the thing)
    # or, inside a Greengrass component, through the nucleus (gateway.publishers.ipc):
    # publisher:
    #   type: ipc
    #   delivery: handoff           # [handoff] done when the nucleus spools it; or receipt: done when
    #                               #   the cloud's receipt for its batch arrives on cmd/<app>/<thing>/receipt
    #   receipt_timeout_s: 60       # [60] receipt delivery: no receipt this long = publish it again
    forwarder:
      batch_size: 100               # [100] readings per message, 1..100
      claim_size: 1000              # [1000] readings claimed from the buffer at once
      window: 64                    # [64] messages in flight
      ack_timeout_s: 30             # [30] no PUBACK for this long while connected = retry
      backoff_min_s: 0.5            # [0.5]
      backoff_max_s: 60             # [60] each of the three at most 86400
      auth_retry_s: 300             # [300] after NOT_AUTHORIZED (a policy fault): retry this slowly
      basic_ingest_rule: null       # [null] a rule name: publish to $aws/rules/<rule>/dt/... (Basic Ingest)
    model:                          # optional: score every reading
      path: models/ashrae-lgbm      # the model folder (model.onnx, golden.json, manifest.json)
      buildings: data/building_metadata.csv  # [the bundled metadata]
      threads: 1                    # [1] 1..64
      threshold: 3.5                # [3.5] anomaly score at or above which a reading is flagged
      save_every_s: 600             # [600] save what the meters learned this often (a crash loses at most that)
      drift_window_h: 24            # [24] drift: RMSLE of the model alone over this many hours of data time, <= 8760
      drift_threshold: 2.5          # [2.5] a site and meter type (or the fleet) above this RMSLE marks the model stale
      drift_min_readings: 24        # [24] ... when at least this many readings are behind the figure
      enabled: true                 # [true]
    weather:                        # optional
      path: data/sample/weather_2016.json.gz
      max_age_s: 10800              # [10800] older weather counts as missing; <= 365 days
"""

from __future__ import annotations

import difflib
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from gateway import validators
from gateway.budget import POLICIES
from gateway.errors import ConfigError, ConfigErrors
from gateway.topics import check_rule_name

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SOURCE_TYPES = ("replay", "simulator", "modbus")
PUBLISHER_TYPES = ("mqtt", "memory", "ipc")
DELIVERY_MODES = ("handoff", "receipt")
#: Environment variables the nucleus sets for every component it runs.
GREENGRASS_ENV = ("SVCUID", "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT")
#: IoT Core's longest MQTT client id, in bytes.
MAX_CLIENT_ID_BYTES = 128

#: The largest config file read, in bytes: a real one is a few KB, and PyYAML reads ~1 MB/s.
MAX_CONFIG_BYTES = 1 << 20
#: The deepest nesting of lists and mappings read (a real config nests 3 deep; PyYAML recurses).
MAX_CONFIG_DEPTH = 32
#: The smallest byte budget, in MB: below it a buffer has no room for readings beside its schema.
MIN_BUDGET_MB = 1
#: The largest durations, in s: beyond them a timeout or window means "never" and overflows timers.
MAX_WINDOW_S = 365 * 86_400
MAX_TIMEOUT_S = 86_400
MAX_DRIFT_WINDOW_H = 8760  # a year of data time
#: The simulator's shortest and longest interval, in s.
MIN_INTERVAL_S, MAX_INTERVAL_S = 1, 86_400


@dataclass
class Config:
    thing: str
    app: str = "meters"
    log_level: str = "INFO"
    buffer: dict = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)
    publisher: dict = field(default_factory=dict)
    forwarder: dict = field(default_factory=dict)
    model: dict | None = None
    weather: dict | None = None
    base: Path = Path(".")
    raw: dict = field(default_factory=dict)


class _Checker:
    """Collects errors while walking a config."""

    def __init__(self, base: Path):
        self.base = base
        self.errors: list[ConfigError] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message))

    def mapping(self, path: str, value: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path or "top level", f"{_show(value)} must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                self.fail(_join(path, str(key)), f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required):
            if key not in value:
                self.fail(_join(path, key), "is required")
        return value

    def get(
        self,
        path: str,
        d: dict,
        key: str,
        kind: type | tuple,
        default: Any = None,
        *,
        nullable: bool = False,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        where = _join(path, key)
        if key not in d:
            return default
        value = original = d[key]
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
            try:
                value = float(value) if int not in kinds else value
            except OverflowError:
                value = math.inf
        else:
            ok = isinstance(value, kinds)
        if not ok:
            hint = ""
            if isinstance(value, str) and (int in kinds or float in kinds) and _is_number(value):
                hint = " (YAML reads it as text: drop any quotes"
                hint += ", and write an exponent with its sign: 1.0e+5)" if float in kinds else ")"
            self.fail(where, f"{_show(value)} must be {_kind_names(kinds, nullable)}{hint}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(where, f"{_show(original)} must be a finite number")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(where, f"{_show(original)} {problem}")
                return default
        return value

    def path(self, where: str, value: str | None, kind: str = "file") -> Path | None:
        """Resolve ``value`` against the config's folder and check it as a ``kind``:
        ``file`` (read), ``dir`` (read) or ``new`` (a file the gateway creates or appends to).
        None (a value already refused for its type) stays None."""
        if value is None:
            return None
        if not value:
            self.fail(where, "'' must not be empty")
            return None
        p = Path(value)
        if not p.is_absolute():
            p = self.base / p
        check = {"file": validators.existing_file, "dir": validators.existing_dir,
                 "new": validators.writable_file}[kind]
        problem = check(p)
        if problem:
            self.fail(where, f"{value} {problem}")
        return p


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    """A value as it reads in YAML: 'text', null, true, [a, b], {type: replay}."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    if value is None or isinstance(value, (bool, list, dict)):
        try:
            text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9)
        except RecursionError:  # a Greengrass update is a dict, not YAML: its depth is not capped
            return "a value nested too deeply to show"
        return text.strip().removesuffix("...").strip()
    return str(value)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind_names(kinds: tuple, nullable: bool) -> str:
    if int in kinds and float in kinds:
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join([_KIND_NAMES.get(k, k.__name__) for k in kinds] + (["null"] if nullable else []))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _num(x: float) -> str:
    """1000000 rather than 1e+06; 0.5 stays 0.5."""
    return str(int(x)) if float(x).is_integer() else str(x)


def gt(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > bound else f"must be > {_num(bound)}"


def at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= bound else f"must be >= {_num(bound)}"


def positive(at_most: float) -> Callable[[Any], str | None]:
    """> 0 and at most ``at_most``: a duration that must end."""
    return lambda v: "must be > 0" if not v > 0 else None if v <= at_most else f"must be <= {_num(at_most)}"


def interval(v: float) -> str | None:
    """A simulator interval: MIN..MAX_INTERVAL_S, a whole number of ms (as SimulatorSource checks it)."""
    if not MIN_INTERVAL_S <= v <= MAX_INTERVAL_S:
        return f"is out of range {MIN_INTERVAL_S}..{MAX_INTERVAL_S}"
    if abs(v * 1000 - round(v * 1000)) > 1e-6:  # 1.001 s is 1000.9999999999999 ms in floating point
        return "must be a whole number of milliseconds"
    return None


def between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"is out of range {_num(lo)}..{_num(hi)}"


def one_of(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"is not one of {', '.join(allowed)}"


def topic_level(what: str) -> Callable[[Any], str | None]:
    def check(v: str) -> str | None:
        if not v:
            return "must not be empty"
        for bad in "/+#":
            if bad in v:
                return f"contains {bad!r}, which cannot stand in a topic level"
        if len(v) > 128:
            return f"is {len(v)} characters long; IoT Core allows at most 128 for a {what}"
        return None

    return check


def in_greengrass(environ: Any = None) -> bool:
    """True when this process runs as a Greengrass component (the nucleus set SVCUID or its IPC
    socket path): the value to pass as ``validate(..., greengrass=)``."""
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in GREENGRASS_ENV)


def client_id(v: str) -> str | None:
    if not v:
        return "must not be empty"
    n = len(v.encode("utf-8", "surrogatepass"))
    return f"is {n} bytes long; IoT Core allows at most {MAX_CLIENT_ID_BYTES}" if n > MAX_CLIENT_ID_BYTES else None


def validate(raw: Any, base: Path = Path("."), *, greengrass: bool = False) -> Config:
    """Check a parsed config and return it with defaults filled in, or raise ConfigErrors.

    ``greengrass=True`` (the caller runs inside Greengrass: :func:`in_greengrass`) adds the rules
    of that place: an mqtt publisher must not use the thing name as its client id."""
    c = _Checker(base)
    top = c.mapping("", raw, {"thing", "app", "log_level", "buffer", "sources", "publisher", "forwarder",
                              "model", "weather"}, {"thing", "sources", "publisher"})
    thing = c.get("", top, "thing", str, "", check=topic_level("thing"))
    app = c.get("", top, "app", str, "meters", check=topic_level("app"))
    log_level = c.get("", top, "log_level", str, "INFO", check=one_of(*LOG_LEVELS))

    b = c.mapping("buffer", top.get("buffer"), {"path", "budget_mb", "policy", "live_window_s", "synchronous"})
    buffer = {
        "path": c.path("buffer.path", c.get("buffer", b, "path", str, "var/buffer.db"), kind="new"),
        "budget_bytes": int(c.get("buffer", b, "budget_mb", (int, float), 1024,
                                  check=between(MIN_BUDGET_MB, 1 << 20)) * 1024 * 1024),
        "policy": c.get("buffer", b, "policy", str, "drop_oldest", check=one_of(*POLICIES)),
        "live_window_ms": int(c.get("buffer", b, "live_window_s", (int, float), 300,
                                    check=positive(MAX_WINDOW_S)) * 1000),
        "synchronous": c.get("buffer", b, "synchronous", str, "full", check=one_of("full", "normal")),
    }

    sources: list[dict] = []
    raw_sources = top.get("sources")
    if "sources" in top and (not isinstance(raw_sources, list) or not raw_sources):
        c.fail("sources", f"{_show(raw_sources)} must be a non-empty list")
        raw_sources = []
    names: dict[str, int] = {}
    kept: list[int] = []  # the index in the config of each source in `sources`
    for i, s in enumerate(raw_sources or []):
        where = _join("sources", i)
        if not isinstance(s, dict):
            c.fail(where, f"{_show(s)} must be a mapping")
            continue
        kind = s.get("type")
        if kind not in SOURCE_TYPES:
            problem = "is required:" if kind is None else f"{_show(kind)} is not"
            c.fail(_join(where, "type"), f"{problem} one of {', '.join(SOURCE_TYPES)}")
            continue
        if kind == "replay":
            s = c.mapping(where, s, {"type", "name", "path", "speed", "batch_size"}, {"path"})
            src = {
                "type": kind,
                "name": c.get(where, s, "name", str, kind, check=lambda v: None if v else "must not be empty"),
                "path": c.path(_join(where, "path"), c.get(where, s, "path", str)),
                "speed": c.get(where, s, "speed", float, None, nullable=True, check=gt(0)),
                "batch_size": c.get(where, s, "batch_size", int, 1000, check=between(1, 100_000)),
            }
        elif kind == "modbus":
            s = c.mapping(where, s, {"type", "name", "interval_s", "jitter_s", "timeout_s", "retries",
                                     "max_spread_intervals", "backoff_max_intervals", "devices", "devices_csv"})
            src = _modbus_source(c, where, s)
        else:
            s = c.mapping(where, s, {"type", "name", "meters", "interval_s", "speed", "anomaly_rate", "seed",
                                     "count", "labels_path", "start"})
            labels = c.get(where, s, "labels_path", str, None, nullable=True)
            start = None
            if s.get("start") is not None:
                start = validators.start_ms(s["start"])
                if isinstance(start, str):
                    c.fail(_join(where, "start"), f"{_show(s['start'])} {start}")
                    start = None
            src = {
                "type": kind,
                "name": c.get(where, s, "name", str, kind, check=lambda v: None if v else "must not be empty"),
                "meters": c.get(where, s, "meters", int, 2380, check=between(1, 1_000_000)),
                "interval_s": c.get(where, s, "interval_s", (int, float), 60, check=interval),
                "speed": c.get(where, s, "speed", float, 1.0, nullable=True, check=gt(0)),
                "anomaly_rate": c.get(where, s, "anomaly_rate", float, 0.0, check=between(0, 1)),
                "seed": c.get(where, s, "seed", int, 1, check=between(0, 2**32 - 1)),
                "count": c.get(where, s, "count", int, None, nullable=True, check=gt(0)),
                "labels_path": c.path(_join(where, "labels_path"), labels, kind="new"),
                "start_ms": start,
            }
        if src["name"] in names:
            hint = "" if "name" in s else " (a source's name defaults to its type: give each source a name)"
            c.fail(_join(where, "name"),
                   f"{_show(src['name'])} is already the name of sources[{names[src['name']]}]{hint}")
        names[src["name"]] = i
        sources.append(src)
        kept.append(i)

    p = top.get("publisher")
    kind = p.get("type") if isinstance(p, dict) else None
    publisher: dict = {}
    if "publisher" in top and p is not None and not isinstance(p, dict):
        c.fail("publisher", f"{_show(p)} must be a mapping")
    elif "publisher" in top and kind not in PUBLISHER_TYPES:
        problem = "is required:" if kind is None else f"{_show(kind)} is not"
        c.fail("publisher.type", f"{problem} one of {', '.join(PUBLISHER_TYPES)}")
    elif kind == "memory":
        c.mapping("publisher", p, {"type"})
        publisher = {"type": "memory"}
    elif kind == "ipc":
        p = c.mapping("publisher", p, {"type", "delivery", "receipt_timeout_s"})
        publisher = {
            "type": "ipc",
            "delivery": c.get("publisher", p, "delivery", str, "handoff", check=one_of(*DELIVERY_MODES)),
            "receipt_timeout_s": c.get("publisher", p, "receipt_timeout_s", (int, float), 60,
                                       check=positive(MAX_TIMEOUT_S)),
        }
    elif kind == "mqtt":
        p = c.mapping("publisher", p, {"type", "endpoint", "port", "cert", "key", "ca", "local", "client_id"},
                      {"endpoint", "cert", "key", "ca"})
        publisher = {
            "type": "mqtt",
            "endpoint": c.get("publisher", p, "endpoint", str, "", check=lambda v: None if v else "must not be empty"),
            "port": c.get("publisher", p, "port", int, 8883, check=between(1, 65535)),
            "local": c.get("publisher", p, "local", bool, False),
            "client_id": c.get("publisher", p, "client_id", str, None, nullable=True, check=client_id),
        }
        for key in ("cert", "key", "ca"):
            if key in p:
                publisher[key] = c.path(f"publisher.{key}", c.get("publisher", p, key, str))
        cid = publisher["client_id"] or thing
        if greengrass and thing and cid == thing:
            shown = "" if "client_id" in p and p["client_id"] is not None else " (the default)"
            c.fail("publisher.client_id", f"{_show(thing)}{shown} is the thing name: inside Greengrass the nucleus "
                                          f"connects as {thing}; the two would keep disconnecting each other "
                                          "(use type: ipc, or another client_id)")
        elif greengrass and thing and cid.startswith(thing + "#") and cid[len(thing) + 1:].isdigit():
            # the nucleus opens more connections as it needs them, as <thing>#2, <thing>#3, ...
            c.fail("publisher.client_id", f"{_show(cid)} is a client id the nucleus uses for its extra connections "
                                          f"({thing}#<n>); the two would keep disconnecting each other "
                                          "(use type: ipc, or another client_id)")

    f = c.mapping("forwarder", top.get("forwarder"), {"batch_size", "claim_size", "window", "ack_timeout_s",
                                                      "backoff_min_s", "backoff_max_s", "auth_retry_s",
                                                      "basic_ingest_rule"})
    forwarder = {
        "batch_size": c.get("forwarder", f, "batch_size", int, 100, check=between(1, 100)),
        "claim_size": c.get("forwarder", f, "claim_size", int, 1000, check=between(1, 100_000)),
        "window": c.get("forwarder", f, "window", int, 64, check=between(1, 10_000)),
        "ack_timeout_s": c.get("forwarder", f, "ack_timeout_s", (int, float), 30, check=positive(MAX_TIMEOUT_S)),
        "backoff_min_s": c.get("forwarder", f, "backoff_min_s", (int, float), 0.5, check=positive(MAX_TIMEOUT_S)),
        "backoff_max_s": c.get("forwarder", f, "backoff_max_s", (int, float), 60, check=positive(MAX_TIMEOUT_S)),
        "auth_retry_s": c.get("forwarder", f, "auth_retry_s", (int, float), 300, check=positive(MAX_TIMEOUT_S)),
        "basic_ingest_rule": c.get("forwarder", f, "basic_ingest_rule", str, None, nullable=True,
                                   check=lambda v: check_rule_name(v) and "must be 1 to 128 letters, digits or underscores"),
    }
    if forwarder["backoff_max_s"] < forwarder["backoff_min_s"]:
        default = "" if "backoff_max_s" in f else " (the default)"
        c.fail("forwarder.backoff_max_s", f"{_show(forwarder['backoff_max_s'])}{default} must be >= "
                                          f"backoff_min_s ({_show(forwarder['backoff_min_s'])})")

    if forwarder["basic_ingest_rule"] and publisher.get("delivery") == "receipt":
        c.fail("forwarder.basic_ingest_rule", f"{forwarder['basic_ingest_rule']!r} with publisher.delivery: receipt: "
                                              "a message sent through Basic Ingest reaches only its rule, not the "
                                              "receipt rule, so no receipt would ever come (use delivery: handoff, "
                                              "or no Basic Ingest)")

    model = _model_section(c, top) if "model" in top else None
    weather = _weather_section(c, top) if "weather" in top else None

    # the files the gateway writes, and every other file named: no two may be one file
    files = [("buffer.path", buffer["path"])]
    shown = {"buffer.path": b.get("path", "var/buffer.db")}
    for i, s in zip(kept, sources):
        if s.get("labels_path"):
            files.append((f"sources[{i}].labels_path", s["labels_path"]))
            shown[files[-1][0]] = raw_sources[i]["labels_path"]
    read = [(f"sources[{i}].path", s["path"]) for i, s in zip(kept, sources) if s.get("path")]
    read += [(f"{name}.{key}", section[key]) for name, section in (("model", model), ("weather", weather))
             if section for key in ("buildings", "path") if section.get(key)]
    read += [(f"publisher.{key}", publisher[key]) for key in ("cert", "key", "ca") if publisher.get(key)]
    for where, other in validators.shared_files(files, read):
        c.fail(where, f"{shown[where]} is also {other}: the gateway would write over it")

    if c.errors:
        raise ConfigErrors(c.errors)
    return Config(thing=thing, app=app, log_level=log_level, buffer=buffer, sources=sources,
                  publisher=publisher, forwarder=forwarder, model=model, weather=weather, base=base, raw=top)


#: The keys of one Modbus device (``sources[i].devices[j]`` or a row of ``devices_csv``) and their types.
DEVICE_KEYS: dict[str, type | tuple] = {
    "name": str, "map": str, "transport": str, "host": str, "port": int, "serial": str, "baudrate": int,
    "parity": str, "stopbits": int, "bytesize": int, "unit_id": int, "site": str, "building": str, "meter": str,
    "max_power_kw": (int, float), "energy": str, "registers": list, "timeout_s": (int, float), "retries": int,
}
MAX_DEVICES = 100_000


def _modbus_source(c: _Checker, where: str, s: dict) -> dict:
    """A ``type: modbus`` source: its settings and its devices, from ``devices`` and ``devices_csv``."""
    src = {
        "type": "modbus",
        "name": c.get(where, s, "name", str, "modbus", check=lambda v: None if v else "must not be empty"),
        "interval_s": c.get(where, s, "interval_s", (int, float), 60, check=interval),
        "jitter_s": c.get(where, s, "jitter_s", (int, float), 0.0, check=between(0, MAX_INTERVAL_S)),
        "max_spread_intervals": c.get(where, s, "max_spread_intervals", int, 60, check=between(1, 100_000)),
        "backoff_max_intervals": c.get(where, s, "backoff_max_intervals", int, 16, check=between(1, 100_000)),
    }
    timeout = c.get(where, s, "timeout_s", (int, float), 1.0, check=between(0.05, 60))
    retries = c.get(where, s, "retries", int, 1, check=between(0, 10))
    if src["jitter_s"] and src["interval_s"] and src["jitter_s"] >= src["interval_s"]:
        c.fail(_join(where, "jitter_s"), f"{_show(s['jitter_s'])} must be < interval_s ({_show(src['interval_s'])})")
    entries: list[tuple[str, dict, bool]] = []  # (where, raw device, from a CSV)
    raw_devices = s.get("devices")
    if "devices" in s and (not isinstance(raw_devices, list)):
        c.fail(_join(where, "devices"), f"{_show(raw_devices)} must be a list")
        raw_devices = []
    for j, d in enumerate(raw_devices or []):
        entries.append((_join(_join(where, "devices"), j), d, False))
    if s.get("devices_csv") is not None:
        path = c.path(_join(where, "devices_csv"), c.get(where, s, "devices_csv", str))
        if path is not None and path.is_file():
            entries.extend(_csv_devices(c, _join(where, "devices_csv"), path))
    if not entries and "devices" not in s and "devices_csv" not in s:
        c.fail(_join(where, "devices"), "is required (or devices_csv): the meters to poll")
    elif not entries and not c.errors:
        c.fail(_join(where, "devices"), "has no device (a modbus source needs at least one)")
    maps: dict[str, Any] = {}
    devices: list[dict] = []
    names: dict[str, str] = {}
    units: dict[tuple, str] = {}
    lines: dict[str, tuple[str, dict]] = {}  # serial port -> (where, its settings)
    for dw, d, from_csv in entries:
        dev = _device(c, dw, d, timeout, retries, maps, c.base)
        if dev is None:
            continue
        if dev["name"] in names:
            c.fail(_join(dw, "name"), f"{_show(dev['name'])} is already the name of {names[dev['name']]}")
        names.setdefault(dev["name"], dw)
        bus = (dev["serial"],) if dev["transport"] == "rtu" else (dev["host"], dev["port"])
        if (bus, dev["unit_id"]) in units:
            c.fail(_join(dw, "unit_id"), f"{dev['unit_id']} is already the unit_id of {units[(bus, dev['unit_id'])]} "
                                         "on the same line")
        units.setdefault((bus, dev["unit_id"]), dw)
        if dev["transport"] == "rtu":
            line = {k: dev[k] for k in ("baudrate", "parity", "stopbits", "bytesize")}
            first = lines.setdefault(dev["serial"], (dw, line))
            for k, v in line.items():
                if first[1][k] != v:
                    c.fail(_join(dw, k), f"{_show(v)} differs from {first[0]}'s {_show(first[1][k])} on the same "
                                         f"serial line {dev['serial']} (one bus, one setting)")
        devices.append(dev)
    if len(devices) > MAX_DEVICES:
        c.fail(_join(where, "devices"), f"{len(devices)} devices is more than {MAX_DEVICES}")
    src["devices"] = devices
    return src


def _device(c: _Checker, dw: str, d: Any, timeout: float, retries: int, maps: dict, base: Path) -> dict | None:
    from gateway.readings import METER_TYPES
    from gateway.registermap import load_map

    required = {"unit_id", "site", "building", "map"}
    d = c.mapping(dw, d, set(DEVICE_KEYS), required)
    if not d:
        return None
    nonempty = lambda v: None if v else "must not be empty"  # noqa: E731
    dev: dict[str, Any] = {
        "unit_id": c.get(dw, d, "unit_id", int, None, check=between(1, 247)),
        "site": c.get(dw, d, "site", str, None, check=topic_level("site")),
        "building": c.get(dw, d, "building", str, None, check=nonempty),
        "meter": c.get(dw, d, "meter", str, "electricity", check=one_of(*METER_TYPES)),
        "host": c.get(dw, d, "host", str, None, check=nonempty),
        "port": c.get(dw, d, "port", int, 502, check=between(1, 65535)),
        "serial": c.get(dw, d, "serial", str, None, check=nonempty),
        "baudrate": c.get(dw, d, "baudrate", int, 9600, check=one_of_int(1200, 2400, 4800, 9600, 19200, 38400,
                                                                            57600, 115200)),
        "parity": c.get(dw, d, "parity", str, "N", check=one_of("N", "E", "O")),
        "stopbits": c.get(dw, d, "stopbits", int, 1, check=between(1, 2)),
        "bytesize": c.get(dw, d, "bytesize", int, 8, check=between(7, 8)),
        "max_power_kw": c.get(dw, d, "max_power_kw", (int, float), None, nullable=True, check=gt(0)),
        "timeout_s": c.get(dw, d, "timeout_s", (int, float), timeout, check=between(0.05, 60)),
        "retries": c.get(dw, d, "retries", int, retries, check=between(0, 10)),
        "energy": c.get(dw, d, "energy", str, None, nullable=True),
        "registers": c.get(dw, d, "registers", list, None, nullable=True),
    }
    default_transport = "rtu" if dev["serial"] and not dev["host"] else "tcp"
    dev["transport"] = c.get(dw, d, "transport", str, default_transport, check=one_of("tcp", "rtu-over-tcp", "rtu"))
    if dev["transport"] == "rtu":
        if not dev["serial"] and "serial" not in d:
            c.fail(_join(dw, "serial"), "is required with transport rtu (the serial port, e.g. /dev/ttyUSB0)")
        if "host" in d:
            c.fail(_join(dw, "host"), "is not used with transport rtu (give serial, or transport tcp)")
    elif dev["transport"]:
        if not dev["host"] and "host" not in d:
            c.fail(_join(dw, "host"), f"is required with transport {dev['transport']} (or give serial for rtu)")
        if "serial" in d:
            c.fail(_join(dw, "serial"), f"is not used with transport {dev['transport']} (use transport rtu)")
    m = c.get(dw, d, "map", str, None, check=nonempty)
    rmap = None
    if m is not None:
        key = m if "/" not in m and not m.endswith((".yaml", ".yml")) else str(base / m)
        if key not in maps:
            try:
                maps[key] = load_map(key)
            except ConfigError as exc:
                maps[key] = exc
        rmap = maps[key]
        if isinstance(rmap, ConfigError):
            for e in getattr(rmap, "errors", [rmap]):
                c.fail(_join(dw, "map"), f"{_show(m)} {e.message}" if e.path == m else f"{_show(m)}: {e}")
            rmap = None
        else:
            dev["map"] = rmap
    if rmap is not None:
        names = {r.name for r in rmap.registers}
        if dev["energy"] is not None:
            if dev["energy"] not in names:
                c.fail(_join(dw, "energy"), f"{_show(dev['energy'])} is not a register of {rmap.name} "
                                            f"(its energy registers: {', '.join(r.name for r in rmap.of_meaning('energy'))})")
            elif rmap.register(dev["energy"]).meaning != "energy":
                c.fail(_join(dw, "energy"), f"{_show(dev['energy'])} is a power register, not an energy counter")
        for k, n in enumerate(dev["registers"] or []):
            if n not in names:
                c.fail(f"{_join(dw, 'registers')}[{k}]", f"{_show(n)} is not a register of {rmap.name} "
                                                         f"(it has: {', '.join(sorted(names))})")
    if "name" in d:
        dev["name"] = c.get(dw, d, "name", str, None, check=nonempty)
    if not dev.get("name"):
        dev["name"] = f"{dev['serial'] if dev['transport'] == 'rtu' else dev['host']}#{dev['unit_id']}"
    if any(dev[k] is None for k in ("unit_id", "site", "building")) or rmap is None:
        return None
    return dev


def one_of_int(*allowed: int) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"is not one of {', '.join(map(str, allowed))}"


def _csv_devices(c: _Checker, where: str, path: Path) -> list[tuple[str, dict, bool]]:
    """The devices of a CSV (a header of device keys, one device a row); each error names
    ``<file>:<line>`` (the header is line 1)."""
    import csv

    out: list[tuple[str, dict, bool]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                c.fail(where, f"{path.name} is empty (it needs a header of device keys: {', '.join(DEVICE_KEYS)})")
                return out
            header = [h.strip() for h in header]
            for h in header:
                if h not in DEVICE_KEYS:
                    near = difflib.get_close_matches(h, sorted(DEVICE_KEYS), n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    c.fail(f"{path.name}:1", f"column {h!r} is not a device key{hint} "
                                             f"(allowed: {', '.join(sorted(DEVICE_KEYS))})")
            if any(h not in DEVICE_KEYS for h in header):
                return out
            for row in rows:
                line = rows.line_num
                if not any(cell.strip() for cell in row):
                    continue
                lw = f"{path.name}:{line}"
                if len(row) != len(header):
                    c.fail(lw, f"{len(row)} cells, but the header has {len(header)}")
                    continue
                d: dict[str, Any] = {}
                for h, cell in zip(header, row):
                    cell = cell.strip()
                    if cell == "":
                        continue
                    d[h] = _csv_value(c, _join(lw, h), DEVICE_KEYS[h], cell)
                if len(out) >= MAX_DEVICES:
                    c.fail(lw, f"more than {MAX_DEVICES} devices")
                    break
                out.append((lw, d, True))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        c.fail(where, f"{path.name}: cannot read the devices: {exc}")
    return out


def _csv_value(c: _Checker, where: str, kind: type | tuple, cell: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if list in kinds:
        return [part.strip() for part in cell.split(";") if part.strip()]
    if int in kinds and float not in kinds:
        try:
            return int(cell)
        except ValueError:
            return cell  # c.get says it must be an integer
    if float in kinds:
        try:
            return float(cell)
        except ValueError:
            return cell
    return cell


def _model_section(c: _Checker, top: dict) -> dict:
    from gateway.model.online import THRESHOLD  # its one home, beside the score it thresholds

    m = c.mapping("model", top.get("model"), {"path", "buildings", "threads", "threshold", "enabled", "save_every_s",
                                              "drift_window_h", "drift_threshold", "drift_min_readings"}, {"path"})
    out = {
        "enabled": c.get("model", m, "enabled", bool, True),
        "threads": c.get("model", m, "threads", int, 1, check=between(1, 64)),
        "threshold": c.get("model", m, "threshold", (int, float), THRESHOLD, check=gt(0)),
        "save_every_s": c.get("model", m, "save_every_s", (int, float), 600, check=positive(MAX_TIMEOUT_S)),
        "drift_window_h": c.get("model", m, "drift_window_h", (int, float), 24, check=positive(MAX_DRIFT_WINDOW_H)),
        "drift_threshold": c.get("model", m, "drift_threshold", (int, float), 2.5, check=gt(0)),
        "drift_min_readings": c.get("model", m, "drift_min_readings", int, 24, check=at_least(1)),
    }
    if "path" in m:
        out["path"] = c.path("model.path", c.get("model", m, "path", str), kind="dir")
    if "buildings" in m:
        out["buildings"] = c.path("model.buildings", c.get("model", m, "buildings", str))
    else:
        from gateway.model.paths import default_buildings

        out["buildings"] = default_buildings()
        if out["buildings"] is None:
            c.fail("model.buildings", "is required (no bundled data/building_metadata.csv to default to)")
    return out


def _weather_section(c: _Checker, top: dict) -> dict:
    w = c.mapping("weather", top.get("weather"), {"path", "max_age_s"}, {"path"})
    out = {"max_age_ms": int(c.get("weather", w, "max_age_s", (int, float), 3 * 3600,
                                   check=positive(MAX_WINDOW_S)) * 1000)}
    if "path" in w:
        out["path"] = c.path("weather.path", c.get("weather", w, "path", str))
    return out


def _read(path: Path) -> bytes:
    """The bytes of a config file: a regular file of at most MAX_CONFIG_BYTES, checked before
    reading (a FIFO would block the read, a huge file would take PyYAML minutes)."""
    def refuse(problem: str) -> ConfigError:
        return ConfigError(str(path), f"cannot read the config: {problem}")

    def check(st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise refuse("Is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"not a regular file ({validators._kind(st.st_mode)})")
        if st.st_size > MAX_CONFIG_BYTES:
            raise refuse(f"{st.st_size:,} bytes is more than the {MAX_CONFIG_BYTES:,} a config may have")

    try:
        check(os.stat(path))
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it does not hang
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise refuse(exc.strerror) from exc
    with open(fd, "rb") as f:
        check(os.fstat(f.fileno()))
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:  # it grew after the stat
        raise refuse(f"more than the {MAX_CONFIG_BYTES:,} bytes a config may have")
    return data


def load(path: str | Path, *, greengrass: bool = False) -> Config:
    """Read and validate a YAML config file (``greengrass``: see :func:`validate`)."""
    path = Path(path)
    data = _read(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"cannot read the config: not UTF-8 (byte 0x{exc.object[exc.start]:02x} "
                                     f"at offset {exc.start})") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; it has no mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        raise ConfigError(f"{path}:{line}:{column}", f"not valid YAML: {exc.reason} (U+{exc.character:04X})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, f"not valid YAML: {problem}") from exc
    if raw is None:
        raise ConfigError(str(path), "the config is empty (it needs at least thing, sources and publisher)")
    return validate(raw, base=path.resolve().parent, greengrass=greengrass)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)
    and nesting deeper than MAX_CONFIG_DEPTH (PyYAML would recurse until a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self._depth >= MAX_CONFIG_DEPTH and not self.check_event(yaml.ScalarEvent, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_CONFIG_DEPTH} deep", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # the base class reports unhashable keys; merges (<<) are not duplicates
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)
