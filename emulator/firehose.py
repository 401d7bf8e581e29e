"""Amazon Data Firehose, emulated from the template: records in, buffered objects out to the local S3.

``cloud/analytics.yaml``'s ``AWS::KinesisFirehose::DeliveryStream`` (an ExtendedS3 destination) is
the whole configuration; nothing here is hard-coded to it. What the template says, and what
happens here:

- **Dynamic partitioning** (``DynamicPartitioningConfiguration.Enabled``): each record is parsed
  as JSON and the ``MetadataExtraction`` processor's JQ query (``{kind: .kind}``, run with the
  ``jq`` package's libjq) gives its partition keys. Each distinct set of keys has a buffer of its
  own. A record that is not JSON, or whose query yields a missing (null) or non-scalar key, goes
  to the error output (``!{firehose:error-output-type}`` = ``processing-failed``) as a JSON
  error document holding the record in base64, so nothing is lost.
- **AppendDelimiterToRecord**: the delimiter (``"\\n"`` in the template, an escaped newline) is
  appended to every record.
- **BufferingHints**: a buffer is delivered as one object as soon as it holds ``SizeInMBs``
  (counted before compression, as Firehose does) or its oldest record is ``IntervalInSeconds``
  old, whichever comes first. A timer thread checks the interval; :meth:`LocalFirehose.flush`
  and :meth:`LocalFirehose.close` deliver everything at once.
- **Prefix / ErrorOutputPrefix**: ``!{partitionKeyFromQuery:k}``, ``!{timestamp:<Java pattern>}``
  (UTC, the arrival time of the oldest record in the object), ``!{firehose:error-output-type}``
  and ``!{firehose:random-string}``.
- **Object names** as Firehose's: ``<prefix><stream>-<version>-<yyyy-MM-dd-HH-mm-ss>-<uuid>``
  plus ``.gz`` for ``CompressionFormat: GZIP`` (the only other format supported is
  ``UNCOMPRESSED``).

::

    hose = LocalFirehose(root)                    # cloud/analytics.yaml, bucket metergateway-data
    hose.put_record_batch("metergateway-readings", [payload, ...])   # the IoT rule's action
    hose.flush()        # -> ['readings/kind=raw/dt=2025-03-01/metergateway-readings-1-2025-...gz']
    hose.close()

The clock is injectable (``clock=`` returns epoch seconds); with ``timer=False`` nothing happens
behind the caller's back and :meth:`LocalFirehose.flush_due` delivers what the interval makes due.
"""

from __future__ import annotations

import base64
import codecs
import datetime as _dt
import functools
import gzip
import json
import logging
import os
import re
import secrets
import string
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from emulator.cfn import load_template, resolve
from emulator.s3 import LocalBucket

__all__ = [
    "FirehoseError",
    "LocalFirehose",
    "StreamConfig",
    "java_datetime",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "cloud" / "analytics.yaml"
STREAM_VERSION = 1
MIB = 1024 * 1024


class FirehoseError(ValueError):
    """A template or a call the local Firehose cannot take, saying what and where."""


# ------------------------------------------------------------------ Java date patterns

_JAVA = {"yyyy": "%Y", "uuuu": "%Y", "yy": "%y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M",
         "ss": "%S", "D": "%j", "DDD": "%j"}


def java_datetime(pattern: str) -> Callable[[_dt.datetime], str]:
    """A formatter for the subset of Java DateTimeFormatter patterns Firehose prefixes use.

    Supports yyyy, yy, MM, dd, HH, mm, ss, SSS, quoted literals ('-') and punctuation.
    """
    parts: list[Callable[[_dt.datetime], str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise FirehoseError(f"timestamp pattern {pattern!r}: unclosed quote")
            lit = pattern[i + 1:end] or "'"
            parts.append(lambda d, lit=lit: lit)
            i = end + 1
        elif c in string.ascii_letters:
            j = i
            while j < len(pattern) and pattern[j] == c:
                j += 1
            run = pattern[i:j]
            if run == "SSS":
                parts.append(lambda d: f"{d.microsecond // 1000:03d}")
            elif run in _JAVA:
                parts.append(lambda d, f=_JAVA[run]: d.strftime(f))
            else:
                raise FirehoseError(f"timestamp pattern {pattern!r}: {run!r} is not supported locally")
            i = j
        else:
            parts.append(lambda d, lit=c: lit)
            i += 1
    return lambda d: "".join(p(d) for p in parts)


_EXPR = re.compile(r"!\{([A-Za-z]+):([^}]*)\}")


def _evaluate_prefix(prefix: str, where: str, arrival: float, keys: dict | None,
                     error_type: str | None) -> str:
    moment = _dt.datetime.fromtimestamp(arrival, tz=_dt.timezone.utc)

    def one(m: re.Match) -> str:
        ns, value = m.group(1), m.group(2)
        if ns == "timestamp":
            return java_datetime(value)(moment)
        if ns == "partitionKeyFromQuery":
            if keys is None or value not in keys:
                raise FirehoseError(f"{where}: !{{partitionKeyFromQuery:{value}}}: the query yields no key {value!r}")
            return keys[value]
        if ns == "firehose" and value == "error-output-type":
            if error_type is None:
                raise FirehoseError(f"{where}: !{{firehose:error-output-type}} is for ErrorOutputPrefix only")
            return error_type
        if ns == "firehose" and value == "random-string":
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(11))
        raise FirehoseError(f"{where}: !{{{ns}:{value}}} is not supported locally")

    return _EXPR.sub(one, prefix)


# ------------------------------------------------------------------ configuration


@dataclass
class StreamConfig:
    """One delivery stream's ExtendedS3 destination, resolved."""

    name: str
    bucket: str
    prefix: str
    error_prefix: str
    compression: str
    size_bytes: int
    interval_s: float
    partitioning: bool
    query: str | None
    delimiter: bytes

    @classmethod
    def from_resource(cls, logical: str, props: dict) -> "StreamConfig":
        where = f"Resources.{logical}.Properties.ExtendedS3DestinationConfiguration"
        dest = props.get("ExtendedS3DestinationConfiguration")
        if not isinstance(dest, dict):
            raise FirehoseError(f"{where}: missing (only ExtendedS3 destinations are emulated)")
        arn = dest.get("BucketARN", "")
        if not str(arn).startswith("arn:aws:s3:::"):
            raise FirehoseError(f"{where}.BucketARN: {arn!r} is not an S3 bucket ARN")
        hints = dest.get("BufferingHints", {})
        compression = dest.get("CompressionFormat", "UNCOMPRESSED")
        if compression not in ("GZIP", "UNCOMPRESSED"):
            raise FirehoseError(f"{where}.CompressionFormat: {compression} is not emulated (GZIP, UNCOMPRESSED)")
        partitioning = bool(dest.get("DynamicPartitioningConfiguration", {}).get("Enabled", False))
        query, delimiter = None, b""
        processing = dest.get("ProcessingConfiguration", {})
        if processing.get("Enabled", False):
            for i, proc in enumerate(processing.get("Processors", [])):
                params = {p["ParameterName"]: p["ParameterValue"] for p in proc.get("Parameters", [])}
                if proc["Type"] == "MetadataExtraction":
                    engine = params.get("JsonParsingEngine", "JQ-1.6")
                    if not engine.startswith("JQ-"):
                        raise FirehoseError(f"{where}.ProcessingConfiguration.Processors[{i}]: "
                                            f"JsonParsingEngine {engine} is not emulated")
                    query = params["MetadataExtractionQuery"]
                elif proc["Type"] == "AppendDelimiterToRecord":
                    delimiter = codecs.decode(params.get("Delimiter", "\\n"), "unicode_escape").encode()
                else:
                    raise FirehoseError(f"{where}.ProcessingConfiguration.Processors[{i}]: "
                                        f"{proc['Type']} is not emulated")
        if partitioning and query is None and "partitionKeyFromQuery" in dest.get("Prefix", ""):
            raise FirehoseError(f"{where}.Prefix uses partitionKeyFromQuery but no MetadataExtraction query is set")
        return cls(
            name=props.get("DeliveryStreamName") or logical,
            bucket=arn[len("arn:aws:s3:::"):],
            prefix=dest.get("Prefix", "!{timestamp:yyyy/MM/dd/HH}/"),
            error_prefix=dest.get("ErrorOutputPrefix", "!{firehose:error-output-type}/!{timestamp:yyyy/MM/dd/HH}/"),
            compression=compression,
            size_bytes=int(float(hints.get("SizeInMBs", 5)) * MIB),
            interval_s=float(hints.get("IntervalInSeconds", 300)),
            partitioning=partitioning,
            query=query,
            delimiter=delimiter,
        )


@dataclass
class _Buffer:
    keys: dict | None
    error_type: str | None
    oldest: float
    records: list[bytes] = field(default_factory=list)
    size: int = 0


# ------------------------------------------------------------------ the service


_SIMPLE_QUERY = re.compile(r"^[\s{}:,A-Za-z0-9_.]*$")
_FIELD = re.compile(r"(?<![A-Za-z0-9_])\.([A-Za-z_][A-Za-z0-9_]*)")


@functools.lru_cache(maxsize=64)
def _top_fields(program: str) -> tuple[str, ...] | None:
    """The top-level fields a MetadataExtraction query reads, when it is made only of object
    constructions and paths (``{kind: .kind, site: .a.b}``); None for anything else (then jq gets
    the whole record). Parsing the record once in Python and giving jq only those fields is the
    same result, several times faster than jq parsing a whole message."""
    if not _SIMPLE_QUERY.match(program) or ".." in program:
        return None
    fields = tuple(dict.fromkeys(_FIELD.findall(program)))
    return fields or None


class LocalFirehose:
    """Every delivery stream of a template, delivering into ``<root>/s3/<bucket>/``."""

    def __init__(self, root: str | os.PathLike, template_path: str | os.PathLike = DEFAULT_TEMPLATE,
                 bucket: str = "metergateway-data", params: dict | None = None,
                 clock: Callable[[], float] = time.time, timer: bool = True):
        self.root = Path(root)
        self.clock = clock
        template = load_template(template_path)
        names = dict(params or {})
        names.update({k: bucket for k, r in template.get("Resources", {}).items() if r["Type"] == "AWS::S3::Bucket"})
        self.streams: dict[str, StreamConfig] = {}
        for logical, res in template.get("Resources", {}).items():
            if res["Type"] == "AWS::KinesisFirehose::DeliveryStream":
                props = resolve(res.get("Properties", {}), names, template=template)
                cfg = StreamConfig.from_resource(logical, props)
                self.streams[cfg.name] = cfg
        if not self.streams:
            raise FirehoseError(f"{template_path}: no AWS::KinesisFirehose::DeliveryStream resource")
        self._queries = {}
        for name, cfg in self.streams.items():
            if cfg.partitioning and cfg.query:
                import jq  # the emulator extra; imported here so that loading this module costs nothing

                self._queries[name] = jq.compile(cfg.query)
        self._buckets = {cfg.bucket: LocalBucket(self.root, cfg.bucket) for cfg in self.streams.values()}
        self._lock = threading.Lock()
        self._buffers: dict[tuple, _Buffer] = {}
        self.records_in = 0
        self.records_delivered = 0
        self.records_failed = 0
        self.objects: list[str] = []
        self._stop = threading.Event()
        self._thread = None
        if timer:
            poll = max(0.05, min(1.0, min(c.interval_s for c in self.streams.values()) / 10))
            self._thread = threading.Thread(target=self._run_timer, args=(poll,), name="firehose-timer",
                                            daemon=True)
            self._thread.start()

    # -- intake

    def put_record_batch(self, stream_name: str, records: list[bytes]) -> None:
        """Accept records (each one bytes), as PutRecordBatch; objects are written as buffers fill."""
        cfg = self.streams.get(stream_name)
        if cfg is None:
            raise FirehoseError(f"ResourceNotFoundException: delivery stream {stream_name!r} not found "
                                f"(the template has {sorted(self.streams)})")
        if len(records) > 500:
            raise FirehoseError(f"PutRecordBatch: {len(records)} records; at most 500 a call")
        full = []
        arrival = self.clock()
        query = self._queries.get(stream_name)
        prepared = []
        for data in records:
            if isinstance(data, str):
                data = data.encode()
            keys, error = (None, None)
            if cfg.partitioning:
                keys, error = self._partition_keys(query, data)
            prepared.append((data, keys, error))
        with self._lock:
            self.records_in += len(records)
            for data, keys, error in prepared:
                if error is not None:
                    self.records_failed += 1
                    doc = {"attemptsMade": 1, "arrivalTimestamp": int(arrival * 1000),
                           "errorCode": "DynamicPartitioning.MetadataExtractionFailed",
                           "errorMessage": error, "attemptEndingTimestamp": int(arrival * 1000),
                           "rawData": base64.b64encode(data).decode()}
                    data, bkey, etype = json.dumps(doc).encode(), (stream_name, "error", "processing-failed"), "processing-failed"
                    keys = None
                    record = data + b"\n"
                else:
                    bkey = (stream_name, "data") + tuple(sorted((keys or {}).items()))
                    etype = None
                    record = data + cfg.delimiter
                buf = self._buffers.get(bkey)
                if buf is None:
                    buf = self._buffers[bkey] = _Buffer(keys=keys, error_type=etype, oldest=arrival)
                buf.records.append(record)
                buf.size += len(record)
                if buf.size >= cfg.size_bytes:
                    full.append((bkey, self._buffers.pop(bkey)))
        self._deliver_all(full)

    def _partition_keys(self, query, data: bytes) -> tuple[dict | None, str | None]:
        try:
            fields = _top_fields(query.program_string)
            if fields is None:
                out = query.input_text(data.decode("utf-8")).first()
            else:  # the query reads only these top-level fields: hand jq just them (a record is ~4 KB)
                record = json.loads(data)
                if not isinstance(record, dict):
                    out = query.input_value(record).first()
                else:
                    out = query.input_value({k: record[k] for k in fields if k in record}).first()
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"Non JSON record provided: {exc}"
        if not isinstance(out, dict):
            return None, f"The metadata extraction query must yield a JSON object, not {json.dumps(out)}"
        keys = {}
        for k, v in out.items():
            if v is None:
                return None, f"partition key {k!r} is null (missing from the record)"
            if isinstance(v, (dict, list)):
                return None, f"partition key {k!r} is not a scalar: {json.dumps(v)}"
            keys[k] = json.dumps(v) if isinstance(v, bool) else str(v)
        return keys, None

    # -- delivery

    def flush_due(self, now: float | None = None) -> list[str]:
        """Deliver every buffer whose oldest record is at least IntervalInSeconds old."""
        now = self.clock() if now is None else now
        with self._lock:
            due = [(k, b) for k, b in self._buffers.items()
                   if now - b.oldest >= self.streams[k[0]].interval_s]
            for k, _ in due:
                del self._buffers[k]
        return self._deliver_all(due)

    def flush(self) -> list[str]:
        """Deliver every buffer now; the keys of the objects written."""
        with self._lock:
            due = list(self._buffers.items())
            self._buffers.clear()
        return self._deliver_all(due)

    def close(self) -> list[str]:
        """Stop the timer and deliver what is buffered."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        return self.flush()

    def __enter__(self) -> "LocalFirehose":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self) -> int:
        """Records accepted but not yet in an object."""
        with self._lock:
            return sum(len(b.records) for b in self._buffers.values())

    def _deliver_all(self, items: list[tuple[tuple, _Buffer]]) -> list[str]:
        """Deliver each buffer; one that cannot be written is kept and the first error raised after."""
        keys, failure = [], None
        for bkey, buf in items:
            try:
                key = self._deliver(bkey, buf)
            except OSError as exc:
                failure = failure or exc
                continue
            if key:
                keys.append(key)
        if failure is not None:
            raise failure
        return keys

    def _deliver(self, bkey: tuple, buf: _Buffer) -> str | None:
        if not buf.records:
            return None
        cfg = self.streams[bkey[0]]
        if buf.error_type is None:
            prefix = _evaluate_prefix(cfg.prefix, f"{cfg.name}.Prefix", buf.oldest, buf.keys, None)
        else:
            prefix = _evaluate_prefix(cfg.error_prefix, f"{cfg.name}.ErrorOutputPrefix", buf.oldest, None,
                                      buf.error_type)
        stamp = _dt.datetime.fromtimestamp(buf.oldest, tz=_dt.timezone.utc).strftime("%Y-%m-%d-%H-%M-%S")
        key = f"{prefix}{cfg.name}-{STREAM_VERSION}-{stamp}-{uuid.uuid4()}"
        body = b"".join(buf.records)
        if cfg.compression == "GZIP":
            body = gzip.compress(body, compresslevel=1)  # speed over size: the emulated cloud must keep up with the gateway
            key += ".gz"
        try:
            self._buckets[cfg.bucket].put(key, body)
        except OSError:
            # Firehose retries a failed S3 delivery; here the records go back to be tried again.
            with self._lock:
                again = self._buffers.get(bkey)
                if again is None:
                    self._buffers[bkey] = buf
                else:
                    again.records[:0] = buf.records
                    again.size += buf.size
                    again.oldest = min(again.oldest, buf.oldest)
            log.exception("firehose %s: cannot write s3://%s/%s; %d records kept for the next try",
                          cfg.name, cfg.bucket, key, len(buf.records))
            raise
        with self._lock:
            if buf.error_type is None:
                self.records_delivered += len(buf.records)
            self.objects.append(key)
        log.debug("firehose %s: %d records -> s3://%s/%s", cfg.name, len(buf.records), cfg.bucket, key)
        return key

    def _run_timer(self, poll: float) -> None:
        while not self._stop.wait(poll):
            try:
                self.flush_due()
            except OSError:
                pass  # logged by _deliver; the records are kept and tried again
