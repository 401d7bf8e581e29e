"""MQTT topics, after the AWS whitepaper's pattern ``dt/<app>/<context>/<thing>/<type>``.

Readings go to ``dt/meters/<site>/<thing>/raw`` and, once scored, ``.../scored``. IoT Core
allows at most 256 bytes and 7 slashes in a topic, and no wildcards in a published one.
"""

from __future__ import annotations

from gateway.errors import UndeliverableError

MAX_TOPIC_BYTES = 256
MAX_TOPIC_SLASHES = 7
MAX_PAYLOAD_BYTES = 128 * 1024


def topic(app: str, site: str, thing: str, kind: str) -> str:
    """The data topic for ``kind`` ("raw" or "scored") of ``site``'s readings on ``thing``."""
    return f"dt/{app}/{site}/{thing}/{kind}"


def check_topic(name: str) -> None:
    """Raise :class:`UndeliverableError` naming what is wrong with a topic to publish to."""
    size = len(name.encode("utf-8"))
    if not name:
        raise UndeliverableError("topic is empty")
    if size > MAX_TOPIC_BYTES:
        raise UndeliverableError(f"topic {name[:40]!r}... is {size} bytes, more than IoT Core's {MAX_TOPIC_BYTES}")
    slashes = name.count("/")
    if slashes > MAX_TOPIC_SLASHES:
        raise UndeliverableError(f"topic {name!r} has {slashes} slashes, more than IoT Core's {MAX_TOPIC_SLASHES}")
    if "+" in name or "#" in name:
        raise UndeliverableError(f"topic {name!r} contains a wildcard (+ or #)")
    if name.startswith("$"):
        raise UndeliverableError(f"topic {name!r} starts with $, which is reserved")
    if "\x00" in name or any(part == "" for part in name.split("/")):
        raise UndeliverableError(f"topic {name!r} has an empty level or a NUL character")


def check_level(what: str, value: str) -> str | None:
    """Why ``value`` cannot be one level of a topic, or None."""
    if not value:
        return f"{what} is empty"
    for bad in "/+#\x00":
        if bad in value:
            return f"{what} {value!r} contains {bad!r}, which cannot stand in a topic level"
    return None
