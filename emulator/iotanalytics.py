"""AWS IoT Analytics, emulated from ``cloud/legacy-iot-analytics.yaml``: the seed's design kept
running after the service ended (2025-12-15).

IoT Analytics moved messages through four resources, and so does this module, reading each one
from the template (the one source of truth, loaded with :mod:`emulator.cfn`):

- **channel**: keeps every raw message it is given (``BatchPutMessage``) for its
  ``RetentionPeriod``; here one SQLite file per channel, ``<root>/iotanalytics/channels/<name>.sqlite``,
  expired by the injected clock;
- **pipeline**: the activities in their order of ``Next``, in AWS's shapes (``channel``,
  ``filter {filter}``, ``math {attribute, math}``, ``addAttributes {attributes: {old: new}}``,
  ``removeAttributes {attributes: [...]}``, ``selectAttributes {attributes: [...]}``,
  ``datastore``); filter and math expressions are IoT Analytics' expression language
  (:mod:`emulator.iotanalytics_expr`). Messages go through it as they arrive, as in the service;
  :meth:`LocalIoTAnalytics.start_pipeline_reprocessing` runs a channel's kept messages again;
- **datastore**: a DuckDB table named as the datastore, one column per attribute (added as
  attributes appear, widened when their type changes) plus ``__dt``, the day the message
  reached the datastore, a ``TIMESTAMP`` at midnight UTC, as AWS partitions its data stores;
  ``<root>/iotanalytics/datastores/<name>.duckdb``;
- **dataset**: its ``QueryAction`` SQL is Presto (IoT Analytics ran Athena's engine), transpiled
  with sqlglot to DuckDB and run over the datastore on the trigger's schedule
  (``cron(...)``/``rate(...)``, :class:`Schedule`) or after another dataset
  (``TriggeringDataset``). Each content is a CSV (Athena's: a header, every value quoted, nulls
  empty), kept as the service kept it (``<root>/iotanalytics/datasets/<name>/<versionId>.csv``,
  the versions its ``VersioningConfiguration`` and ``RetentionPeriod`` say) and delivered to every
  ``ContentDeliveryRules`` S3 destination, ``<root>/s3/<bucket>/<key>``, with ``!{iotanalytics:
  scheduleTime}``, ``!{iotanalytics:creationTime}`` and ``!{iotanalytics:versionId}`` filled in.

::

    ia = LocalIoTAnalytics(root, clock=clock)
    ia.batch_put_message("metergateway_channel", [{"site": "15", "building": "1433", ...}])
    ia.datastore_query("SELECT count(*) FROM metergateway_datastore").rows
    ia.run_due()                      # ['metergateway_highres'] at hh:05
    ia.run_dataset("metergateway_daily")   # Path of the CSV

Everything is in process and thread-safe (one lock); the datastore's DuckDB file is held open by
this object, so other processes read it through this object (the dashboard does), not directly.
"""

from __future__ import annotations

import calendar
import io
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import duckdb
import sqlglot

from emulator import cfn
from emulator.iotanalytics_expr import UNDEFINED, ExpressionError, attribute, compile_expression

__all__ = [
    "LocalIoTAnalytics", "IoTAnalyticsError", "InvalidRequest", "ResourceNotFound",
    "BatchPutMessageError", "Pipeline", "Schedule", "Result", "MAX_BATCH",
]

log = logging.getLogger(__name__)

#: BatchPutMessage takes at most this many messages a call.
MAX_BATCH = 100
#: The attribute names IoT Analytics accepts (its documented pattern).
ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_]([A-Za-z0-9]*|[A-Za-z0-9][A-Za-z0-9_]*)$")
DAY = 86400.0


class IoTAnalyticsError(Exception):
    """Base of what the emulated IoT Analytics refuses, named as AWS names it."""


class InvalidRequest(IoTAnalyticsError):
    """AWS's InvalidRequestException: a call or a template resource the service would refuse."""


class ResourceNotFound(IoTAnalyticsError):
    """AWS's ResourceNotFoundException: no channel, pipeline, datastore or dataset by that name."""


class BatchPutMessageError(IoTAnalyticsError):
    """Some messages of a BatchPutMessage were refused; the others were taken.

    ``entries`` is AWS's ``batchPutMessageErrorEntries``:
    ``[{"messageId", "errorCode", "errorMessage"}]``."""

    def __init__(self, channel: str, entries: list[dict]):
        self.channel = channel
        self.entries = entries
        first = entries[0]
        super().__init__(f"channel {channel}: {len(entries)} message(s) refused, first "
                         f"{first['messageId']}: {first['errorCode']}: {first['errorMessage']}")


@dataclass
class Result:
    """A query's result: column names and rows (tuples), as :mod:`emulator.athena` returns them."""

    columns: list[str]
    rows: list[tuple]


# ---------------------------------------------------------------------------------- shapes


def _camel(key: str) -> str:
    """CloudFormation's PascalCase property names to the API's camelCase (``ChannelName`` ->
    ``channelName``), so a pipeline reads the same from a template or an API-shaped dict."""
    return key[:1].lower() + key[1:]


def _api_shape(value: Any, keep: frozenset = frozenset()) -> Any:
    if isinstance(value, list):
        return [_api_shape(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = _camel(k)
            out[key] = v if key in keep else _api_shape(v, _KEEP.get(key, frozenset()))
        return out
    return value


# addAttributes' "attributes" is a map of attribute names: its keys are data, not properties.
_KEEP = {"addAttributes": frozenset({"attributes"})}


def _retention_seconds(retention: dict | None) -> float | None:
    """Seconds a RetentionPeriod keeps data, None for unlimited (no period: AWS's default is
    unlimited for channels and data stores)."""
    if not retention:
        return None
    retention = _api_shape(retention)
    if retention.get("unlimited"):
        return None
    days = retention.get("numberOfDays")
    if days is None:
        return None
    if int(days) < 1:
        raise InvalidRequest(f"retentionPeriod.numberOfDays: {days} must be >= 1")
    return int(days) * DAY


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _epoch(now: float | datetime | None, clock: Callable[[], float]) -> float:
    if now is None:
        return float(clock())
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        return now.timestamp()
    return float(now)


# ---------------------------------------------------------------------------------- channel


class Channel:
    """A channel's raw messages, kept in SQLite for the retention period."""

    def __init__(self, name: str, path: Path, retention_s: float | None):
        self.name = name
        self.path = path
        self.retention_s = retention_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, "
                        "message_id TEXT NOT NULL, arrival REAL NOT NULL, payload TEXT NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS messages_arrival ON messages (arrival)")

    def put(self, entries: list[tuple[str, dict]], arrival: float) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO messages (message_id, arrival, payload) VALUES (?, ?, ?)",
                            [(mid, arrival, json.dumps(m, separators=(",", ":"))) for mid, m in entries])
        self.db.execute("COMMIT")

    def expire(self, now: float) -> int:
        """Drop what is older than the retention period; how many messages went."""
        if self.retention_s is None:
            return 0
        return self.db.execute("DELETE FROM messages WHERE arrival < ?", (now - self.retention_s,)).rowcount

    def messages(self, start: float | None = None, end: float | None = None) -> Iterable[tuple[float, dict]]:
        """(arrival, message) kept in [start, end), oldest first."""
        rows = self.db.execute(
            "SELECT arrival, payload FROM messages WHERE arrival >= ? AND arrival < ? ORDER BY seq",
            (start if start is not None else -math.inf, end if end is not None else math.inf)).fetchall()
        for arrival, payload in rows:
            yield arrival, json.loads(payload)

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM messages").fetchone()[0]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------------- datastore

#: Rows a datastore holds before it writes them (a read writes them at once).
FLUSH_ROWS = 20000
# pandas' nullable dtypes of the column types, so a null stays a null and ints stay exact
_PANDAS = {"BIGINT": "Int64", "DOUBLE": "Float64", "BOOLEAN": "boolean"}


def _sql_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT" if -2**63 <= value < 2**63 else "DOUBLE"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, (dict, list)):
        return "JSON"
    return "VARCHAR"


def _widen(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    return "VARCHAR"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Datastore:
    """A datastore: one DuckDB table (``<name>__messages``) and a view named as the datastore,
    the attributes' columns first and ``__dt`` last, as Glue put partition columns."""

    def __init__(self, name: str, path: Path, retention_s: float | None):
        self.name = name
        self.path = path
        self.retention_s = retention_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = duckdb.connect(str(path))
        self.db.execute("SET TimeZone = 'UTC'")
        self.table = f"{name}__messages"
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {_quote(self.table)} (__dt TIMESTAMP NOT NULL)")
        # lower-case name -> (column name, type): DuckDB's identifiers, like AWS's attribute
        # names, are case-insensitive
        self.columns: dict[str, tuple[str, str]] = {}
        for col, typ in self.db.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position", [self.table]).fetchall():
            if col != "__dt":
                self.columns[col.lower()] = (col, typ)
        self._pending: list[tuple[dict, datetime]] = []
        self._view()

    def _view(self) -> None:
        cols = ", ".join(_quote(c) for c, _ in self.columns.values())
        self.db.execute(f"CREATE OR REPLACE VIEW {_quote(self.name)} AS SELECT "
                        f"{cols + ', ' if cols else ''}__dt FROM {_quote(self.table)}")

    def _schema_changes(self, messages: list[dict]) -> bool:
        for m in messages:
            for k, v in m.items():
                have = self.columns.get(k.lower())
                if have is None:
                    return True
                t = _sql_type(v)
                if t is not None and _widen(have[1], t) != have[1]:
                    return True
        return False

    def _schema(self, messages: list[dict]) -> None:
        wanted: dict[str, tuple[str, str]] = {}
        for m in messages:
            for k, v in m.items():
                t = _sql_type(v)
                if t is None:
                    wanted.setdefault(k.lower(), (k, ""))
                    continue
                name, old = wanted.get(k.lower(), (k, ""))
                wanted[k.lower()] = (name, _widen(old, t) if old else t)
        changed = False
        for low, (name, typ) in wanted.items():
            have = self.columns.get(low)
            if have is None:
                typ = typ or "VARCHAR"
                self.db.execute(f"ALTER TABLE {_quote(self.table)} ADD COLUMN {_quote(name)} {typ}")
                self.columns[low] = (name, typ)
                changed = True
            elif typ and _widen(have[1], typ) != have[1]:
                new = _widen(have[1], typ)
                self.db.execute(f"ALTER TABLE {_quote(self.table)} ALTER COLUMN {_quote(have[0])} TYPE {new}")
                self.columns[low] = (have[0], new)
                changed = True
        if changed:
            self._view()

    def insert(self, messages: list[dict], arrival: float) -> None:
        """Add messages that reached the datastore at ``arrival``. They are written in batches
        (DuckDB takes thousands of rows at once far faster than a hundred): held until
        :data:`FLUSH_ROWS` are waiting or anything reads the datastore."""
        if not messages:
            return
        if self._schema_changes(messages):
            self.flush()
            self._schema(messages)
        dt = _utc(arrival).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        for m in messages:
            self._pending.append(({k.lower(): v for k, v in m.items()}, dt))
        if len(self._pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the held rows."""
        if not self._pending:
            return
        import pandas as pd  # only the datastore needs it, and only when it writes

        pending, self._pending = self._pending, []
        frame = {}
        for low, (name, typ) in self.columns.items():
            cells = [self._cell(m.get(low), typ) for m, _ in pending]
            frame[name] = pd.array(cells, dtype=_PANDAS.get(typ, object))
        frame["__dt"] = pd.array([dt for _, dt in pending], dtype="datetime64[us]")
        df = pd.DataFrame(frame)  # noqa: F841 (DuckDB reads it by name)
        cols = ", ".join(_quote(c) for c in df.columns)
        self.db.execute(f"INSERT INTO {_quote(self.table)} ({cols}) SELECT {cols} FROM df")

    @staticmethod
    def _cell(value: Any, typ: str) -> Any:
        if value is None:
            return None
        if typ == "JSON" or (typ == "VARCHAR" and isinstance(value, (dict, list))):
            return json.dumps(value, separators=(",", ":"))
        if typ == "VARCHAR" and isinstance(value, bool):
            return "true" if value else "false"
        if typ == "VARCHAR" and not isinstance(value, str):
            return json.dumps(value)
        if typ == "DOUBLE":
            return float(value)
        return value

    def expire(self, now: float) -> int:
        if self.retention_s is None:
            return 0
        self.flush()
        cutoff = _utc(now - self.retention_s).replace(tzinfo=None)
        # a day partition goes when all of its day is older than the retention period
        cur = self.db.execute(f"DELETE FROM {_quote(self.table)} WHERE __dt + INTERVAL 1 DAY <= ?", [cutoff])
        return cur.fetchone()[0]

    def query(self, sql: str) -> Result:
        self.flush()
        cur = self.db.execute(sql)
        columns = [d[0] for d in cur.description] if cur.description else []
        return Result(columns, [tuple(r) for r in cur.fetchall()])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()


# ---------------------------------------------------------------------------------- pipeline

_SUPPORTED = ("channel", "filter", "math", "addAttributes", "removeAttributes", "selectAttributes", "datastore")


def _delete_path(message: dict, path: list[str]) -> None:
    node: Any = message
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def _copy(message: dict) -> dict:
    """A copy the activities may change: nested objects and arrays copied too."""
    if any(isinstance(v, (dict, list)) for v in message.values()):
        return json.loads(json.dumps(message))
    return dict(message)


class Pipeline:
    """A pipeline's activities, chained by ``next`` from its ``channel`` activity to its
    ``datastore`` activity. Built from the API's shape (``[{"filter": {"name", "filter",
    "next"}}, ...]``) or CloudFormation's (``Filter: {Name, Filter, Next}``)."""

    def __init__(self, name: str, activities: list[dict]):
        self.name = name
        by_name: dict[str, tuple[str, dict]] = {}
        for i, entry in enumerate(_api_shape(activities)):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise InvalidRequest(f"pipeline {name}: pipelineActivities[{i}] must hold exactly one activity")
            (kind, spec), = entry.items()
            if kind not in _SUPPORTED:
                raise InvalidRequest(f"pipeline {name}: pipelineActivities[{i}]: the {kind} activity is not "
                                     f"emulated (supported: {', '.join(_SUPPORTED)})")
            act = spec.get("name")
            if not act:
                raise InvalidRequest(f"pipeline {name}: pipelineActivities[{i}].{kind} has no name")
            if act in by_name:
                raise InvalidRequest(f"pipeline {name}: two activities are named {act!r}")
            by_name[act] = (kind, spec)
        channels = [a for a, (k, _) in by_name.items() if k == "channel"]
        if len(channels) != 1 or not any(k == "datastore" for k, _ in by_name.values()):
            raise InvalidRequest(f"pipeline {name}: needs exactly one channel activity and a datastore activity")
        self.channel = by_name[channels[0]][1]["channelName"]
        self.steps: list[tuple[str, str, Any]] = []  # (kind, activity name, compiled spec)
        seen = set()
        current: str | None = channels[0]
        while current is not None:
            if current not in by_name:
                raise InvalidRequest(f"pipeline {name}: 'next' names {current!r}, which is not an activity")
            if current in seen:
                raise InvalidRequest(f"pipeline {name}: the activities loop at {current!r}")
            seen.add(current)
            kind, spec = by_name[current]
            self.steps.append((kind, current, self._compile(kind, current, spec)))
            current = None if kind == "datastore" else spec.get("next")
            if kind != "datastore" and current is None:
                raise InvalidRequest(f"pipeline {name}: activity {self.steps[-1][1]!r} has no next and is "
                                     "not the datastore activity")
        self.datastore = self.steps[-1][2]

    def _compile(self, kind: str, act: str, spec: dict) -> Any:
        try:
            if kind == "filter":
                return compile_expression(spec["filter"])
            if kind == "math":
                if not ATTRIBUTE_NAME.match(spec.get("attribute", "")):
                    raise InvalidRequest(f"pipeline {self.name}: activity {act}: attribute "
                                         f"{spec.get('attribute')!r} is not a valid attribute name")
                return spec["attribute"], compile_expression(spec["math"])
        except ExpressionError as exc:
            raise InvalidRequest(f"pipeline {self.name}: activity {act}: {exc}") from exc
        except KeyError as exc:
            raise InvalidRequest(f"pipeline {self.name}: activity {act}: {kind} needs {exc.args[0]!r}") from exc
        if kind == "addAttributes":
            attrs = spec.get("attributes") or {}
            if not isinstance(attrs, dict) or not attrs:
                raise InvalidRequest(f"pipeline {self.name}: activity {act}: attributes must map "
                                     "existing attribute names to new ones")
            return [(tuple(src.split(".")), dst) for src, dst in attrs.items()]
        if kind in ("removeAttributes", "selectAttributes"):
            attrs = spec.get("attributes") or []
            if not isinstance(attrs, list) or not attrs:
                raise InvalidRequest(f"pipeline {self.name}: activity {act}: attributes must be a list of names")
            return [a.split(".") for a in attrs]
        if kind == "datastore":
            return spec["datastoreName"]
        return None

    def run(self, message: dict) -> dict | None:
        """The message as it reaches the datastore, or None when an activity drops it."""
        m = _copy(message)
        for kind, _act, spec in self.steps:
            if kind == "filter":
                if spec(m) is not True:
                    return None
            elif kind == "math":
                attr, expr = spec
                value = expr(m)
                if value is not UNDEFINED and not (isinstance(value, float) and not math.isfinite(value)):
                    m[attr] = value
            elif kind == "addAttributes":
                for path, dst in spec:
                    value = attribute(m, path)
                    if value is not UNDEFINED:
                        m[dst] = json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value
            elif kind == "removeAttributes":
                for path in spec:
                    _delete_path(m, path)
            elif kind == "selectAttributes":
                out: dict = {}
                for path in spec:
                    value = attribute(m, tuple(path))
                    if value is UNDEFINED:
                        continue
                    node = out
                    for key in path[:-1]:
                        node = node.setdefault(key, {})
                    node[path[-1]] = value
                m = out
        return m


# ---------------------------------------------------------------------------------- schedule

_MONTHS = {n.upper(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAYS = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
_RATE_UNITS = {"minute": 60, "minutes": 60, "hour": 3600, "hours": 3600, "day": 86400, "days": 86400}


class Schedule:
    """A schedule expression as EventBridge (and so IoT Analytics) reads it.

    ``cron(Minutes Hours Day-of-month Month Day-of-week Year)``, all UTC: ``,`` ``-`` ``*``
    ``/`` everywhere, ``?`` in one of the two day fields (exactly one must be ``?``), ``L``
    (last day of the month; ``<d>L`` last such weekday), ``W`` (nearest weekday, ``LW``) and
    ``#`` (``<d>#<n>``, n-th such weekday); months ``1-12`` or ``JAN-DEC``, weekdays ``1-7``
    = ``SUN-SAT``, years 1970-2199. ``rate(<n> minute|minutes|hour|hours|day|days)`` runs every
    n units from the dataset's creation::

        Schedule("cron(15 0 * * ? *)").next_after(datetime(2017, 1, 1, 0, 15, tzinfo=timezone.utc))
        # datetime(2017, 1, 2, 0, 15, tzinfo=timezone.utc)
    """

    def __init__(self, expression: str):
        self.expression = expression.strip()
        m = re.fullmatch(r"(cron|rate)\((.*)\)", self.expression)
        if not m:
            raise InvalidRequest(f"schedule {expression!r}: must be cron(...) or rate(...)")
        self.kind = m.group(1)
        if self.kind == "rate":
            r = re.fullmatch(r"\s*(\d+)\s+([a-z]+)\s*", m.group(2))
            if not r or r.group(2) not in _RATE_UNITS or int(r.group(1)) < 1:
                raise InvalidRequest(f"schedule {expression!r}: rate needs '<n> minute(s)|hour(s)|day(s)'")
            n, unit = int(r.group(1)), r.group(2)
            if (n == 1) != (not unit.endswith("s")):
                raise InvalidRequest(f"schedule {expression!r}: use the singular unit for 1, the plural otherwise")
            self.every = n * _RATE_UNITS[unit]
            return
        fields = m.group(2).split()
        if len(fields) != 6:
            raise InvalidRequest(f"schedule {expression!r}: cron needs 6 fields "
                                 f"(minutes hours day-of-month month day-of-week year), got {len(fields)}")
        minute, hour, dom, month, dow, year = fields
        if (dom == "?") == (dow == "?"):
            raise InvalidRequest(f"schedule {expression!r}: exactly one of day-of-month and day-of-week must be '?'")
        self.minutes = sorted(self._field(minute, 0, 59, {}, "minutes"))
        self.hours = sorted(self._field(hour, 0, 23, {}, "hours"))
        self.months = sorted(self._field(month, 1, 12, _MONTHS, "month"))
        self.years = sorted(self._field(year, 1970, 2199, {}, "year"))
        self.dom = None if dom == "?" else self._dom(dom)
        self.dow = None if dow == "?" else self._dow(dow)

    def _field(self, text: str, lo: int, hi: int, names: dict, what: str) -> set[int]:
        out: set[int] = set()
        for part in text.split(","):
            step = 1
            if "/" in part:
                part, s = part.split("/", 1)
                if not s.isdigit() or int(s) < 1:
                    raise InvalidRequest(f"schedule {self.expression!r}: {what}: bad step {s!r}")
                step = int(s)
            if part == "*":
                a, b = lo, hi
            elif "-" in part:
                a, b = (self._value(p, lo, hi, names, what) for p in part.split("-", 1))
            else:
                a = self._value(part, lo, hi, names, what)
                b = hi if step > 1 else a
            if a > b:
                raise InvalidRequest(f"schedule {self.expression!r}: {what}: range {part!r} runs backwards")
            out.update(range(a, b + 1, step))
        return out

    def _value(self, text: str, lo: int, hi: int, names: dict, what: str) -> int:
        v = names.get(text.upper()) if names else None
        if v is None:
            if not text.isdigit():
                raise InvalidRequest(f"schedule {self.expression!r}: {what}: {text!r} is not a value")
            v = int(text)
        if not lo <= v <= hi:
            raise InvalidRequest(f"schedule {self.expression!r}: {what}: {v} is out of range {lo}..{hi}")
        return v

    def _dom(self, text: str) -> Callable[[int, int], set[int]]:
        if text in ("L", "LW"):
            def last(y, m):
                d = calendar.monthrange(y, m)[1]
                if text == "LW":
                    while calendar.weekday(y, m, d) >= 5:
                        d -= 1
                return {d}
            return last
        if text.endswith("W"):
            day = self._value(text[:-1], 1, 31, {}, "day-of-month")

            def nearest(y, m):
                n = calendar.monthrange(y, m)[1]
                d = min(day, n)
                wd = calendar.weekday(y, m, d)
                if wd == 5:
                    d = d - 1 if d > 1 else d + 2
                elif wd == 6:
                    d = d + 1 if d < n else d - 2
                return {d}
            return nearest
        days = self._field(text, 1, 31, {}, "day-of-month")
        return lambda y, m: {d for d in days if d <= calendar.monthrange(y, m)[1]}

    def _dow(self, text: str) -> Callable[[int, int], set[int]]:
        def weekday(y, m, d):  # 1 = Sunday .. 7 = Saturday
            return (calendar.weekday(y, m, d) + 1) % 7 + 1

        n_days = lambda y, m: calendar.monthrange(y, m)[1]  # noqa: E731
        if "#" in text:
            d, n = text.split("#", 1)
            want = self._value(d, 1, 7, _DAYS, "day-of-week")
            nth = self._value(n, 1, 5, {}, "day-of-week #")
            return lambda y, m: set([x for x in range(1, n_days(y, m) + 1) if weekday(y, m, x) == want][nth - 1:nth])
        if text.endswith("L") and text != "L":
            want = self._value(text[:-1], 1, 7, _DAYS, "day-of-week")
            return lambda y, m: {max(x for x in range(1, n_days(y, m) + 1) if weekday(y, m, x) == want)}
        days = {7} if text == "L" else self._field(text, 1, 7, _DAYS, "day-of-week")
        return lambda y, m: {x for x in range(1, n_days(y, m) + 1) if weekday(y, m, x) in days}

    def next_after(self, after: datetime, origin: datetime | None = None) -> datetime | None:
        """The first run strictly after ``after`` (UTC), or None when the schedule has ended.
        ``origin`` is where a rate() counts from (the dataset's creation)."""
        if after.tzinfo is None:
            after = after.replace(tzinfo=timezone.utc)
        if self.kind == "rate":
            origin = origin or after
            n = math.floor((after - origin).total_seconds() / self.every) + 1
            return origin + timedelta(seconds=max(n, 1) * self.every)
        start = (after + timedelta(minutes=1)).replace(second=0, microsecond=0)
        for y in self.years:
            if y < start.year:
                continue
            for mo in self.months:
                if (y, mo) < (start.year, start.month):
                    continue
                days = set()
                if self.dom is not None:
                    days = self.dom(y, mo)
                if self.dow is not None:
                    days = self.dow(y, mo)
                for d in sorted(days):
                    if (y, mo, d) < (start.year, start.month, start.day):
                        continue
                    for h in self.hours:
                        for mi in self.minutes:
                            t = datetime(y, mo, d, h, mi, tzinfo=timezone.utc)
                            if t >= start:
                                return t
        return None


# ---------------------------------------------------------------------------------- dataset

_PLACEHOLDER = re.compile(r"!\{iotanalytics:([A-Za-z]+)\}")


def _render_time(t: float) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


def _csv_cell(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("NaN" if math.isnan(value) else
                                                          ("Infinity" if value > 0 else "-Infinity"))
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def to_csv(result: Result) -> bytes:
    """Athena's CSV of a result: a header line, every value in double quotes (quotes doubled),
    a null as an empty unquoted field, lines ending in ``\\n``."""
    out = io.StringIO()

    def line(cells: Iterable[str | None]) -> None:
        out.write(",".join("" if c is None else '"' + c.replace('"', '""') + '"' for c in cells) + "\n")

    line(result.columns)
    for row in result.rows:
        line(_csv_cell(v) for v in row)
    return out.getvalue().encode()


@dataclass
class Dataset:
    name: str
    sql: str                       # Presto, as the template has it
    schedules: list[Schedule]
    triggered_by: list[str]
    deliveries: list[tuple[str, str]]  # (bucket, key template)
    retention_s: float | None
    max_versions: int | None       # None: unlimited; AWS's default keeps the latest only
    duck_sql: str = field(default="")


def _dataset(name: str, props: dict) -> Dataset:
    p = _api_shape(props)
    actions = p.get("actions") or []
    if len(actions) != 1 or "queryAction" not in actions[0]:
        raise InvalidRequest(f"dataset {name}: only one queryAction is emulated (containerAction is not)")
    query = actions[0]["queryAction"]
    if query.get("filters"):
        raise InvalidRequest(f"dataset {name}: queryAction.filters (deltaTime) is not emulated")
    schedules, triggered_by = [], []
    for t in p.get("triggers") or []:
        if "schedule" in t:
            schedules.append(Schedule(t["schedule"]["scheduleExpression"]))
        elif "triggeringDataset" in t:
            triggered_by.append(t["triggeringDataset"]["datasetName"])
        else:
            raise InvalidRequest(f"dataset {name}: trigger {t!r} is not a schedule or a triggeringDataset")
    deliveries = []
    for i, rule in enumerate(p.get("contentDeliveryRules") or []):
        s3 = (rule.get("destination") or {}).get("s3DestinationConfiguration")
        if not s3:
            raise InvalidRequest(f"dataset {name}: contentDeliveryRules[{i}]: only S3 destinations are emulated")
        for placeholder in _PLACEHOLDER.findall(s3["key"]):
            if placeholder not in ("scheduleTime", "versionId", "creationTime"):
                raise InvalidRequest(f"dataset {name}: contentDeliveryRules[{i}].key: unknown "
                                     f"!{{iotanalytics:{placeholder}}}")
        deliveries.append((s3["bucket"], s3["key"]))
    versioning = p.get("versioningConfiguration") or {}
    max_versions = None if versioning.get("unlimited") else int(versioning.get("maxVersions") or 1)
    try:
        duck_sql = sqlglot.transpile(query["sqlQuery"], read="presto", write="duckdb")[0]
    except sqlglot.errors.ParseError as exc:
        raise InvalidRequest(f"dataset {name}: sqlQuery does not parse as Presto SQL: {exc}") from exc
    return Dataset(name, query["sqlQuery"], schedules, triggered_by, deliveries,
                   _retention_seconds(p.get("retentionPeriod")), max_versions, duck_sql)


# ---------------------------------------------------------------------------------- service

REPO = Path(__file__).resolve().parent.parent


def _template(path: str | os.PathLike) -> Path:
    """``path`` as given, or, when it is relative and not there, relative to the repository
    (so the default ``cloud/legacy-iot-analytics.yaml`` works from any directory)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO / p).exists():
        return REPO / p
    return p


class LocalIoTAnalytics:
    """The channels, pipelines, datastores and datasets of one template, under ``<root>/iotanalytics/``
    (and delivered dataset contents under ``<root>/s3/``). ``clock`` gives epoch seconds: arrival
    times, ``__dt``, retention and schedules all read it."""

    def __init__(self, root: str | os.PathLike, template_path: str | os.PathLike = "cloud/legacy-iot-analytics.yaml",
                 clock: Callable[[], float] = time.time, params: dict | None = None):
        self.root = Path(root)
        self.clock = clock
        self.home = self.root / "iotanalytics"
        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str, Path], None]] = []
        template = cfn.load_template(_template(template_path))
        params = dict(params or {})
        resources = template["Resources"]

        def of_type(kind: str) -> list[tuple[str, dict]]:
            return [(lid, cfn.resolve(r.get("Properties") or {}, params, template=template))
                    for lid, r in resources.items() if r.get("Type") == kind]

        self.channels: dict[str, Channel] = {}
        self.datastores: dict[str, Datastore] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.datasets: dict[str, Dataset] = {}
        try:
            for lid, props in of_type("AWS::IoTAnalytics::Channel"):
                name = props.get("ChannelName") or cfn.resource_name(lid, params, template=template)
                if (props.get("ChannelStorage") or {}).get("CustomerManagedS3"):
                    log.info("channel %s: customer-managed S3 storage is kept locally like service-managed", name)
                self.channels[name] = Channel(name, self.home / "channels" / f"{name}.sqlite",
                                              _retention_seconds(props.get("RetentionPeriod")))
            for lid, props in of_type("AWS::IoTAnalytics::Datastore"):
                name = props.get("DatastoreName") or cfn.resource_name(lid, params, template=template)
                self.datastores[name] = Datastore(name, self.home / "datastores" / f"{name}.duckdb",
                                                  _retention_seconds(props.get("RetentionPeriod")))
            for lid, props in of_type("AWS::IoTAnalytics::Pipeline"):
                name = props.get("PipelineName") or cfn.resource_name(lid, params, template=template)
                pipeline = Pipeline(name, props.get("PipelineActivities") or [])
                if pipeline.channel not in self.channels:
                    raise InvalidRequest(f"pipeline {name}: channel {pipeline.channel!r} is not in the template")
                if pipeline.datastore not in self.datastores:
                    raise InvalidRequest(f"pipeline {name}: datastore {pipeline.datastore!r} is not in the template")
                self.pipelines[name] = pipeline
            for lid, props in of_type("AWS::IoTAnalytics::Dataset"):
                name = props.get("DatasetName") or cfn.resource_name(lid, params, template=template)
                self.datasets[name] = _dataset(name, props)
        except Exception:
            self.close()
            raise
        self._state_path = self.home / "datasets" / "state.json"
        self._state = self._load_state()

    # -- state of the datasets: creation time, last schedule check, versions
    def _load_state(self) -> dict:
        try:
            state = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            state = {}
        now = float(self.clock())
        for name in self.datasets:
            state.setdefault(name, {"created": now, "checked": now, "versions": []})
        self._save_state(state)
        return state

    def _save_state(self, state: dict | None = None) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state if state is not None else self._state, indent=1))
        os.replace(tmp, self._state_path)

    # -- channel and pipeline
    def batch_put_message(self, channel_name: str, messages: list) -> None:
        """Put up to 100 messages into a channel; each pipeline reading it runs them into its
        datastore. A message is a dict (the JSON object), JSON bytes or str, or the API's entry
        ``{"messageId": "...", "payload": <JSON bytes or str>}``. Refused messages (not a JSON
        object, attribute names AWS would refuse) raise :class:`BatchPutMessageError` after the
        others are taken, as AWS lists them in ``batchPutMessageErrorEntries``."""
        channel = self.channels.get(channel_name)
        if channel is None:
            raise ResourceNotFound(f"channel {channel_name!r} does not exist (channels: "
                                   f"{', '.join(sorted(self.channels)) or 'none'})")
        if not 1 <= len(messages) <= MAX_BATCH:
            raise InvalidRequest(f"BatchPutMessage takes 1 to {MAX_BATCH} messages, got {len(messages)}")
        taken: list[tuple[str, dict]] = []
        errors: list[dict] = []
        ids: set[str] = set()
        for i, raw in enumerate(messages):
            message_id, body = str(i), raw
            if isinstance(raw, dict) and set(raw) == {"messageId", "payload"} \
                    and isinstance(raw["payload"], (bytes, str)):
                message_id, body = str(raw["messageId"]), raw["payload"]
            if message_id in ids:
                raise InvalidRequest(f"BatchPutMessage: messageId {message_id!r} appears twice in one call")
            ids.add(message_id)
            problem = None
            if isinstance(body, (bytes, str)):
                try:
                    body = json.loads(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    problem = f"payload is not JSON: {exc}"
            if problem is None and not isinstance(body, dict):
                problem = "payload is not a JSON object"
            if problem is None:
                bad = [k for k in body if not ATTRIBUTE_NAME.match(k) or len(k) > 255]
                if bad:
                    problem = (f"attribute name(s) {', '.join(map(repr, bad))} do not match "
                               f"{ATTRIBUTE_NAME.pattern}")
            if problem:
                errors.append({"messageId": message_id, "errorCode": "InvalidRequestException",
                               "errorMessage": problem})
            else:
                taken.append((message_id, body))
        if taken:
            with self._lock:
                now = float(self.clock())
                channel.expire(now)
                channel.put(taken, now)
                self._process(channel_name, [m for _, m in taken], now)
        if errors:
            raise BatchPutMessageError(channel_name, errors)

    def _process(self, channel_name: str, messages: list[dict], arrival: float,
                 pipelines: Iterable[Pipeline] | None = None) -> None:
        for pipeline in pipelines or self.pipelines.values():
            if pipeline.channel != channel_name:
                continue
            out = [r for r in (pipeline.run(m) for m in messages) if r is not None]
            if out:
                self.datastores[pipeline.datastore].insert(out, arrival)

    def start_pipeline_reprocessing(self, pipeline_name: str, start_time: float | None = None,
                                    end_time: float | None = None) -> int:
        """Run a pipeline again over its channel's kept messages that arrived in
        [start_time, end_time) (AWS's StartPipelineReprocessing); how many messages it read."""
        pipeline = self._get(self.pipelines, pipeline_name, "pipeline")
        with self._lock:
            now = float(self.clock())
            channel = self.channels[pipeline.channel]
            channel.expire(now)
            n = 0
            batch: list[dict] = []
            for _arrival, message in channel.messages(start_time, end_time):
                batch.append(message)
                n += 1
                if len(batch) == 1000:
                    self._process(pipeline.channel, batch, now, [pipeline])
                    batch = []
            if batch:
                self._process(pipeline.channel, batch, now, [pipeline])
            return n

    def channel_messages(self, channel_name: str) -> list[dict]:
        """The messages a channel keeps now, oldest first (what SampleChannelData sampled)."""
        channel = self._get(self.channels, channel_name, "channel")
        with self._lock:
            channel.expire(float(self.clock()))
            return [m for _, m in channel.messages()]

    def expire(self, now: float | datetime | None = None) -> None:
        """Apply every retention period (channels, datastores, dataset contents) at ``now``."""
        with self._lock:
            t = _epoch(now, self.clock)
            for channel in self.channels.values():
                channel.expire(t)
            for store in self.datastores.values():
                store.expire(t)
            for name in self.datasets:
                self._prune(name, t)
            self._save_state()

    # -- datastore
    def datastore_query(self, sql: str, dialect: str = "presto") -> Result:
        """Run ``sql`` over the datastores (each a table named as the datastore, with ``__dt``).
        It is Presto SQL as the datasets use, transpiled to DuckDB; ``dialect="duckdb"`` runs it as is."""
        if dialect != "duckdb":
            try:
                sql = sqlglot.transpile(sql, read=dialect, write="duckdb")[0]
            except sqlglot.errors.ParseError as exc:
                raise InvalidRequest(f"query does not parse as {dialect} SQL: {exc}") from exc
        store = self._store_for(sql)
        with self._lock:
            try:
                return store.query(sql)
            except duckdb.Error as exc:
                raise InvalidRequest(f"query failed: {exc}") from exc

    def _store_for(self, sql: str) -> Datastore:
        if len(self.datastores) == 1:
            return next(iter(self.datastores.values()))
        for name, store in self.datastores.items():
            if re.search(rf"\b{re.escape(name)}\b", sql):
                return store
        raise InvalidRequest(f"query names none of the datastores ({', '.join(sorted(self.datastores))})")

    # -- datasets
    def run_due(self, now: float | datetime | None = None) -> list[str]:
        """Run every dataset whose schedule has come since it was last checked (once, for the
        latest scheduled time, however many were missed), then those they trigger; the names run."""
        with self._lock:
            t = _epoch(now, self.clock)
            when = _utc(t)
            ran: list[str] = []
            for name, ds in self.datasets.items():
                state = self._state[name]
                checked, origin = _utc(state["checked"]), _utc(state["created"])
                latest = None
                for schedule in ds.schedules:
                    nxt = schedule.next_after(checked, origin)
                    while nxt is not None and nxt <= when:
                        latest = nxt if latest is None or nxt > latest else latest
                        after = schedule.next_after(nxt, origin)
                        if after is None or after > when:
                            break
                        nxt = after
                state["checked"] = t
                if latest is not None:
                    self._run(name, latest.timestamp(), t, ran)
            self.expire(t)
            return ran

    def run_dataset(self, name: str) -> Path:
        """Create a dataset content now (AWS's CreateDatasetContent); the path of the CSV: the
        first content-delivery rule's S3 object, or the kept content when there is none."""
        self._get(self.datasets, name, "dataset")
        with self._lock:
            t = float(self.clock())
            ran: list[str] = []
            path = self._run(name, t, t, ran)
            self._save_state()
            return path

    def dataset_content(self, name: str, version_id: str = "$LATEST") -> Path:
        """The kept CSV of a dataset's content version (AWS's GetDatasetContent)."""
        self._get(self.datasets, name, "dataset")
        with self._lock:
            versions = list(self._state[name]["versions"])
        if not versions:
            raise ResourceNotFound(f"dataset {name} has no content yet")
        if version_id == "$LATEST":
            return Path(versions[-1]["path"])
        for v in versions:
            if v["versionId"] == version_id:
                return Path(v["path"])
        raise ResourceNotFound(f"dataset {name} has no content version {version_id!r}")

    def _run(self, name: str, schedule_time: float, creation_time: float, ran: list[str]) -> Path:
        ds = self.datasets[name]
        try:
            result = self._store_for(ds.duck_sql).query(ds.duck_sql)
        except duckdb.Error as exc:
            raise InvalidRequest(f"dataset {name}: the query failed: {exc}\n  SQL (DuckDB): {ds.duck_sql}") from exc
        data = to_csv(result)
        version = uuid.uuid4().hex
        kept = self.home / "datasets" / name / f"{version}.csv"
        self._write(kept, data)
        values = {"scheduleTime": _render_time(schedule_time), "creationTime": _render_time(creation_time),
                  "versionId": version}
        delivered: list[str] = []
        for bucket, key in ds.deliveries:
            key = _PLACEHOLDER.sub(lambda m: values[m.group(1)], key).lstrip("/")
            target = self.root / "s3" / bucket / key
            if ".." in Path(key).parts:
                raise InvalidRequest(f"dataset {name}: delivery key {key!r} leaves the bucket")
            self._write(target, data)
            delivered.append(str(target))
        self._state[name]["versions"].append({"versionId": version, "scheduleTime": schedule_time,
                                              "creationTime": creation_time, "path": str(kept),
                                              "delivered": delivered, "rows": len(result.rows)})
        self._prune(name, creation_time)
        ran.append(name)
        for other, dependent in self.datasets.items():
            if name in dependent.triggered_by and other not in ran:
                self._run(other, schedule_time, creation_time, ran)
        log.info("dataset %s: content %s, %d rows, delivered to %s", name, version, len(result.rows),
                 delivered or "(kept only)")
        out = Path(delivered[0]) if delivered else kept
        for listener in list(self._listeners):  # e.g. a retraining cycle, as the seed's notebook was
            try:
                listener(name, out)
            except Exception:  # a listener's failure is its own; the content stands
                log.exception("dataset %s: a content listener failed", name)
        return out

    def add_content_listener(self, fn: Callable[[str, Path], None]) -> Callable[[], None]:
        """Call ``fn(dataset, csv_path)`` after each new dataset content (the way IoT Analytics
        triggered the seed's notebook); returns a function that removes it."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def _prune(self, name: str, now: float) -> None:
        ds = self.datasets[name]
        versions = self._state[name]["versions"]
        keep = versions
        if ds.retention_s is not None:
            keep = [v for v in keep if v["creationTime"] >= now - ds.retention_s]
        if ds.max_versions is not None:
            keep = keep[-ds.max_versions:]
        for v in versions:
            if v not in keep:
                Path(v["path"]).unlink(missing_ok=True)
        self._state[name]["versions"] = keep

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    @staticmethod
    def _get(table: dict, name: str, what: str):
        try:
            return table[name]
        except KeyError:
            raise ResourceNotFound(f"{what} {name!r} does not exist ({what}s: "
                                   f"{', '.join(sorted(table)) or 'none'})") from None

    def close(self) -> None:
        """Write what the datastores hold and the datasets' state; close the files."""
        with self._lock:
            if hasattr(self, "_state"):
                self._save_state()
            for c in self.channels.values():
                c.close()
            for d in self.datastores.values():
                d.close()

    def __enter__(self) -> "LocalIoTAnalytics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
