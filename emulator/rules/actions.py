"""A topic rule's actions, and its error action's message.

Each action of a rule (``Actions:`` in the template, the ``ErrorAction``) becomes one object
with ``run(ctx, output)``: it sends the SELECT's output somewhere, and raises
:class:`ActionFailed` with AWS's kind of message when it cannot. Where they send it is given by
:class:`Actions`, the emulated services::

    Actions(firehose=LocalFirehose(root), iotanalytics=LocalIoTAnalytics(root),
            republish=lambda topic, payload, qos: ..., s3=root / "s3", logs=root / "logs")

- **Republish** (``Topic`` a substitution template, ``Qos`` 0 or 1): ``republish(topic, payload, qos)``.
- **Firehose** (``DeliveryStreamName``, ``BatchMode``, ``Separator``): one record, the output's
  JSON; with ``BatchMode`` and an output that is an array, one record per element, in
  ``put_record_batch`` calls of at most 500 records. ``Separator`` is appended to each record.
- **IotAnalytics** (``ChannelName``, ``BatchMode``): one message, or with ``BatchMode`` one per
  element of an array, in ``batch_put_message`` calls of at most 100 messages.
- **CloudwatchLogs** (``LogGroupName``, ``BatchMode``): one JSON line per message (per element
  with ``BatchMode``) in ``<logs>/<log group without its leading />/<log stream>.log``; the
  stream is the sender's client id, one per gateway.
- **S3** (``BucketName``, ``Key`` a substitution template): the output's bytes as the object
  ``<s3>/<bucket>/<key>``.

A failure of any action gives the rule's error action one message (:func:`error_message`), in
the format of AWS's documentation: ``ruleName``, ``topic``, ``cloudwatchTraceId``, ``clientId``,
``base64OriginalPayload`` and ``failures``: [{``failedAction``, ``failedResource``,
``errorMessage``}].
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emulator.rules.sql import UNDEFINED, Context, dumps, template

__all__ = ["Actions", "ActionFailed", "Action", "build_action", "error_message",
           "FIREHOSE_BATCH", "IOTANALYTICS_BATCH"]

#: PutRecordBatch takes at most 500 records; BatchPutMessage at most 100 messages.
FIREHOSE_BATCH = 500
IOTANALYTICS_BATCH = 100

_SEPARATORS = {"\\n": "\n", "\n": "\n", "\\t": "\t", "\t": "\t", "\\r\\n": "\r\n", "\r\n": "\r\n", ",": ","}


@dataclass
class Actions:
    """The emulated services a rule's actions reach; an action whose service is None fails (and
    its rule's error action says so)."""

    firehose: Any = None        # .put_record_batch(stream_name, records: list[bytes])
    iotanalytics: Any = None    # .batch_put_message(channel_name, messages: list[dict])
    republish: Callable[[str, bytes, int], Any] | None = None
    s3: str | os.PathLike | None = None    # <root>/s3
    logs: str | os.PathLike | None = None  # <root>/logs


class ActionFailed(Exception):
    """An action that could not deliver: ``failure`` is its entry of the error message."""

    def __init__(self, action: "Action", message: str):
        super().__init__(f"{action.failed_action} {action.resource}: {message}")
        self.failure = {"failedAction": action.failed_action, "failedResource": action.resource,
                        "errorMessage": message}


class Action:
    """One configured action: ``kind`` as the template names it (``Firehose``), ``resource``
    what it writes to (a stream, a topic template, a bucket)."""

    kind = ""
    failed_action = ""

    def __init__(self, rule_name: str, props: dict, services: Actions):
        self.rule_name = rule_name
        self.props = props
        self.services = services
        self.resource = ""

    def run(self, ctx: Context, output: Any) -> None:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def fail(self, message: str) -> ActionFailed:
        return ActionFailed(self, message)

    def _service(self, name: str, what: str) -> Any:
        service = getattr(self.services, name)
        if service is None:
            raise self.fail(f"{what} is not part of this emulation (Actions.{name} is None)")
        return service

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resource!r})"


def _elements(output: Any, batch_mode: bool) -> list:
    """What the action sends: with batch mode and an array output, its elements; else the output."""
    if batch_mode and type(output) is list:
        return output
    return [output]


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


class Republish(Action):
    kind, failed_action = "Republish", "RepublishAction"

    def __init__(self, rule_name: str, props: dict, services: Actions):
        super().__init__(rule_name, props, services)
        self.resource = props["Topic"]
        self.topic = template(props["Topic"])
        self.qos = int(props.get("Qos", 0))

    def run(self, ctx: Context, output: Any) -> None:
        publish = self._service("republish", "a broker to republish to")
        topic = self.topic(ctx)
        if not topic or "+" in topic or "#" in topic:
            raise self.fail(f"Failed to republish: {topic!r} is not a topic. Message arrived on: {ctx.topic}")
        try:
            publish(topic, dumps(output), self.qos)
        except Exception as exc:
            raise self.fail(f"Failed to republish to topic {topic}. The error received was {exc}. "
                            f"Message arrived on: {ctx.topic}") from exc


class Firehose(Action):
    kind, failed_action = "Firehose", "FirehoseAction"

    def __init__(self, rule_name: str, props: dict, services: Actions):
        super().__init__(rule_name, props, services)
        self.resource = props["DeliveryStreamName"]
        self.batch_mode = _flag(props.get("BatchMode", False))
        sep = props.get("Separator")
        if sep is not None and sep not in _SEPARATORS:
            raise ValueError(f"Firehose Separator {sep!r}: AWS takes '\\n', '\\t', '\\r\\n' or ','")
        self.separator = _SEPARATORS[sep].encode() if sep is not None else b""

    def run(self, ctx: Context, output: Any) -> None:
        firehose = self._service("firehose", "Firehose")
        records = [dumps(v) + self.separator for v in _elements(output, self.batch_mode) if v is not UNDEFINED]
        for i in range(0, len(records), FIREHOSE_BATCH):
            try:
                firehose.put_record_batch(self.resource, records[i:i + FIREHOSE_BATCH])
            except Exception as exc:
                raise self.fail(f"Failed to send message to Firehose stream {self.resource}. The error "
                                f"received was {exc}. Message arrived on: {ctx.topic}, Action: firehose, "
                                f"Delivery stream: {self.resource}") from exc


class IotAnalytics(Action):
    kind, failed_action = "IotAnalytics", "IotAnalyticsAction"

    def __init__(self, rule_name: str, props: dict, services: Actions):
        super().__init__(rule_name, props, services)
        self.resource = props.get("ChannelName") or props.get("ChannelArn", "").rsplit("/", 1)[-1]
        self.batch_mode = _flag(props.get("BatchMode", False))

    def run(self, ctx: Context, output: Any) -> None:
        analytics = self._service("iotanalytics", "IoT Analytics")
        messages = [v for v in _elements(output, self.batch_mode) if v is not UNDEFINED]
        for i in range(0, len(messages), IOTANALYTICS_BATCH):
            try:
                analytics.batch_put_message(self.resource, messages[i:i + IOTANALYTICS_BATCH])
            except Exception as exc:
                raise self.fail(f"Failed to send message to IoT Analytics channel {self.resource}. The error "
                                f"received was {exc}. Message arrived on: {ctx.topic}") from exc


_STREAM_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class CloudwatchLogs(Action):
    kind, failed_action = "CloudwatchLogs", "CloudwatchLogsAction"
    _lock = threading.Lock()

    def __init__(self, rule_name: str, props: dict, services: Actions):
        super().__init__(rule_name, props, services)
        self.resource = props["LogGroupName"]
        self.batch_mode = _flag(props.get("BatchMode", False))

    def run(self, ctx: Context, output: Any) -> None:
        logs = self._service("logs", "CloudWatch Logs")
        stream = _STREAM_SAFE.sub("_", ctx.client_id or "iot") or "iot"
        path = Path(logs) / self.resource.strip("/") / f"{stream}.log"
        lines = b"".join(dumps(v) + b"\n" for v in _elements(output, self.batch_mode) if v is not UNDEFINED)
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab") as f:
                    f.write(lines)
        except OSError as exc:
            raise self.fail(f"Failed to put log events to log group {self.resource}. The error received was "
                            f"{exc.strerror or exc}. Message arrived on: {ctx.topic}") from exc


class S3(Action):
    kind, failed_action = "S3", "S3Action"

    def __init__(self, rule_name: str, props: dict, services: Actions):
        super().__init__(rule_name, props, services)
        self.resource = props["BucketName"]
        self.key = template(props["Key"])

    def run(self, ctx: Context, output: Any) -> None:
        from emulator.s3 import LocalBucket

        s3 = self._service("s3", "S3")
        key = self.key(ctx)
        try:
            LocalBucket(Path(s3).parent, self.resource).put(key, dumps(output))
        except Exception as exc:
            raise self.fail(f"Failed to put S3 object. The error received was {exc}. Message arrived on: "
                            f"{ctx.topic}, Action: s3, Bucket: {self.resource}, Key: \"{key}\"") from exc


KINDS: dict[str, type[Action]] = {cls.kind: cls for cls in (Republish, Firehose, IotAnalytics, CloudwatchLogs, S3)}


def build_action(rule_name: str, entry: dict, services: Actions) -> Action:
    """The action of one ``Actions`` entry (``{"Firehose": {...}}``) of rule ``rule_name``."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"rule {rule_name}: an action is a mapping with one key, got {entry!r}")
    (kind, props), = entry.items()
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"rule {rule_name}: the {kind} action is not emulated (this emulation has "
                         f"{', '.join(sorted(KINDS))})")
    try:
        return cls(rule_name, props or {}, services)
    except KeyError as exc:
        raise ValueError(f"rule {rule_name}: the {kind} action needs {exc.args[0]}") from None


def error_message(rule_name: str, ctx: Context, failures: list[dict]) -> dict:
    """The error action's message for one rule and message, every failed action in it."""
    return {
        "ruleName": rule_name,
        "topic": ctx.topic,
        "cloudwatchTraceId": ctx.trace_id,
        "clientId": ctx.client_id or "",
        "base64OriginalPayload": base64.b64encode(ctx.payload).decode(),
        "failures": failures,
    }


def error_payload(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()
