"""The model announcement: how the model component tells the gateway where its model is.

Under Greengrass every version of the ``org.metergateway.Model`` component unpacks its model to
a new folder, so the gateway cannot watch one fixed path. Instead the model component announces
its folder on Greengrass local pub/sub, topic :data:`ANNOUNCE_TOPIC`::

    {"component": "org.metergateway.Model", "version": "1.0.3",
     "model": "ashrae-lgbm-20261129T224248Z-05020495", "path": "/greengrass/v2/packages/.../ashrae-lgbm"}

``version`` is the component's version, ``model`` the ``version`` of the folder's
``manifest.json``, ``path`` the absolute folder holding ``model.onnx``, ``golden.json`` and
``manifest.json``. The :class:`Announcer` (the model component's whole job) publishes it at
start, every ``announce_every_s`` (60 s), and whenever anyone publishes on :data:`REQUEST_TOPIC`
(the gateway does, as it starts: ``{}``). The gateway parses each with :func:`parse` and swaps
to a new path or model with :meth:`gateway.model.scoring.ModelHolder.swap`, which verifies the
model first and keeps the old one when the new one fails.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ModelError

log = logging.getLogger(__name__)

COMPONENT = "org.metergateway.Model"
ANNOUNCE_TOPIC = "metergateway/model/announce"
REQUEST_TOPIC = "metergateway/model/request"
DEFAULT_EVERY_S = 60.0
FILES = ("model.onnx", "golden.json", "manifest.json")


@dataclass(frozen=True)
class Announcement:
    component: str
    version: str
    model: str
    path: str

    def payload(self) -> dict[str, str]:
        return asdict(self)


def parse(message: Any) -> Announcement | str:
    """An announcement from its JSON payload (a dict, bytes or text), or why it is unusable."""
    if isinstance(message, (bytes, str)):
        try:
            message = json.loads(message)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return f"not JSON: {exc}"
    if not isinstance(message, dict):
        return "not a JSON object"
    values = {}
    for key in ("component", "version", "model", "path"):
        v = message.get(key)
        if not isinstance(v, str) or not v:
            return f"{key}: {v!r} must be a non-empty string"
        values[key] = v
    if values["component"] != COMPONENT:
        return f"component: {values['component']!r} is not {COMPONENT}"
    if not Path(values["path"]).is_absolute():
        return f"path: {values['path']!r} must be absolute"
    return Announcement(**values)


def model_folder(root: str | Path) -> Path:
    """The model folder at or directly under ``root`` (an artifact unpacks into a subfolder):
    the one holding a ``manifest.json``. ModelError when there is none or more than one."""
    root = Path(root).resolve()
    if (root / "manifest.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("*/manifest.json")) if root.is_dir() else []
    if len(found) != 1:
        what = "no folder" if not found else f"{len(found)} folders ({', '.join(p.name for p in found)})"
        raise ModelError(f"{root}: {what} with a manifest.json; expected one model folder")
    return found[0]


def announcement(root: str | Path, component_version: str) -> Announcement:
    """The announcement of the model folder at or under ``root``, read from its manifest."""
    folder = model_folder(root)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder}: missing {', '.join(missing)}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'manifest.json'}: cannot read: {exc}") from exc
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if not isinstance(version, str) or not version:
        raise ModelError(f"{folder / 'manifest.json'}: version: {version!r} must be a non-empty string")
    return Announcement(COMPONENT, component_version, version, str(folder))


def _json_message(payload: dict):
    from awsiot.greengrasscoreipc.model import JsonMessage, PublishMessage

    return PublishMessage(json_message=JsonMessage(message=payload))


def message_payload(event: Any) -> Any:
    """The payload of a local pub/sub event (a SubscriptionResponseMessage): the JSON object of
    a JSON message, the bytes of a binary one."""
    if getattr(event, "json_message", None) is not None:
        return event.json_message.message
    if getattr(event, "binary_message", None) is not None:
        return event.binary_message.message
    return None


def request(ipc) -> None:
    """Ask the model component for an announcement (the gateway does, as it starts)."""
    ipc.publish_to_topic(topic=REQUEST_TOPIC, publish_message=_json_message({}))


class Announcer:
    """The model component: announce ``root``'s model at start, every ``every_s``, and on each
    request. ``ipc`` is a ``GreengrassCoreIPCClientV2``."""

    def __init__(self, ipc, root: str | Path, component_version: str, *, every_s: float = DEFAULT_EVERY_S):
        if not every_s > 0:
            raise ValueError(f"announce_every_s: {every_s!r} must be > 0")
        self.ipc = ipc
        self.announcement = announcement(root, component_version)  # a broken artifact: raise, at once
        self.every_s = every_s
        self.stop_event = threading.Event()
        self.wanted = threading.Event()  # set by a request
        self.sent = 0
        self._operation = None

    def announce(self) -> None:
        self.ipc.publish_to_topic(topic=ANNOUNCE_TOPIC, publish_message=_json_message(self.announcement.payload()))
        self.sent += 1
        log.info("announced model %s at %s", self.announcement.model, self.announcement.path)

    def _on_request(self, _event: Any) -> None:
        self.wanted.set()

    def run(self) -> None:
        """Announce until :meth:`stop`; a failed publish is logged and tried again at the next turn."""
        self._operation = self.ipc.subscribe_to_topic(topic=REQUEST_TOPIC, on_stream_event=self._on_request,
                                                      on_stream_error=_keep_open)
        self.wanted.set()
        try:
            while True:
                self.wanted.wait(self.every_s)  # a request, a stop, or the period
                self.wanted.clear()
                if self.stop_event.is_set():
                    break
                try:
                    self.announce()
                except Exception as exc:  # the nucleus may be restarting; try again next turn
                    log.warning("could not announce the model: %s: %s", type(exc).__name__, exc)
        finally:
            _close(self._operation)

    def stop(self) -> None:
        self.stop_event.set()
        self.wanted.set()


def _keep_open(exc: Exception) -> bool:
    log.warning("model request stream error: %s: %s", type(exc).__name__, exc)
    return False  # keep the stream open


def _close(result: Any) -> None:
    """Close a subscription's operation (the second of what ``subscribe_to_*`` returns)."""
    if isinstance(result, tuple) and len(result) == 2:
        try:
            result[1].close()
        except Exception as exc:  # closing while the nucleus goes away
            log.debug("closing a stream: %s", exc)


def main(ipc, root: str | Path, component_version: str) -> None:
    """The model component's entry: its ``announce_every_s`` from its configuration, then run."""
    value = ipc.get_configuration(key_path=[]).value or {}
    every = value.get("announce_every_s", DEFAULT_EVERY_S)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every > 0:
        raise ModelError(f"announce_every_s: {every!r} must be a number > 0")
    announcer = Announcer(ipc, root, component_version, every_s=float(every))
    if threading.current_thread() is threading.main_thread():
        import signal

        signal.signal(signal.SIGTERM, lambda *_: announcer.stop())
    announcer.run()
