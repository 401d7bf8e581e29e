"""MQTT topics, after the AWS whitepaper's pattern ``dt/<app>/<context>/<thing>/<type>``, and
IoT Core's limits on what is published: the one home of both.

Readings go to ``dt/meters/<site>/<thing>/raw`` and, once scored, ``.../scored``.

**Basic Ingest.** With a rule name, the same topic is prefixed ``$aws/rules/<rule>/``: IoT Core
hands the message straight to that topic rule, skipping the message broker (and its cost);
subscribers never see it. IoT Core's topic limits then apply to the part after the prefix.

**IoT Core's limits** (AWS IoT Core endpoints and quotas): a payload of at most 128 KB; a topic
of at most 256 bytes of UTF-8 and 7 slashes, without wildcards; per connection, at most 100
publishes/s and 512 KB/s. The last two are enforced by awscrt's flow control
(``gateway.publishers.mqtt``); :func:`check_message` checks the others before any publish.
"""

from __future__ import annotations

import re

MAX_PAYLOAD_BYTES = 128 * 1024
MAX_TOPIC_BYTES = 256
MAX_TOPIC_SLASHES = 7
MAX_PUBLISHES_PER_S = 100
MAX_BYTES_PER_S = 512 * 1024

BASIC_INGEST_PREFIX = "$aws/rules/"
_RULE_NAME = re.compile(r"^[A-Za-z0-9_]{1,128}$")


def topic(app: str, site: str, thing: str, kind: str, basic_ingest_rule: str | None = None) -> str:
    """The data topic for ``kind`` ("raw" or "scored") of ``site``'s readings on ``thing``,
    through the Basic Ingest rule ``basic_ingest_rule`` when one is given."""
    name = f"dt/{app}/{site}/{thing}/{kind}"
    return name if basic_ingest_rule is None else basic_ingest(name, basic_ingest_rule)


def basic_ingest(name: str, rule: str) -> str:
    """``name`` sent through the Basic Ingest rule ``rule``: ``$aws/rules/<rule>/<name>``."""
    return f"{BASIC_INGEST_PREFIX}{rule}/{name}"


def check_rule_name(rule: str) -> str | None:
    """Why ``rule`` cannot name an IoT topic rule (letters, digits, underscores; 1..128), or None."""
    if not isinstance(rule, str) or not _RULE_NAME.match(rule):
        return f"rule name {rule!r} must be 1 to 128 letters, digits or underscores"
    return None


def check_topic(name: str) -> str | None:
    """What is wrong with ``name`` as a topic to publish to on IoT Core, or None."""
    if not isinstance(name, str):
        return f"topic must be str, not {type(name).__name__}"
    if not name:
        return "topic is empty"
    shown = name if len(name) <= 64 else name[:61] + "..."
    counted = name
    if name.startswith("$"):
        if not name.startswith(BASIC_INGEST_PREFIX):
            return f"topic {shown!r} starts with $, which is reserved (only a {BASIC_INGEST_PREFIX}<rule>/ prefix is allowed)"
        rule, _, counted = name[len(BASIC_INGEST_PREFIX):].partition("/")
        problem = check_rule_name(rule)
        if problem is not None:
            return f"topic {shown!r}: {problem}"
        if not counted:
            return f"topic {shown!r} has nothing after its Basic Ingest prefix"
    try:
        n = len(counted.encode("utf-8"))
    except UnicodeEncodeError:
        return f"topic {shown!r} is not valid UTF-8"
    if n > MAX_TOPIC_BYTES:
        return f"topic {shown!r} is {n} bytes, more than {MAX_TOPIC_BYTES}"
    slashes = counted.count("/")
    if slashes > MAX_TOPIC_SLASHES:
        return f"topic {shown!r} has {slashes} slashes, more than {MAX_TOPIC_SLASHES}"
    if "+" in name or "#" in name:
        return f"topic {shown!r} contains a wildcard (+ or #)"
    if "\x00" in name:
        return f"topic {shown!r} contains a NUL character"
    if "" in counted.split("/"):
        return f"topic {shown!r} has an empty level"
    return None


def check_message(topic: str, payload: bytes, qos: int) -> str | None:
    """What is wrong with this publish for IoT Core, or None. Never touches the network."""
    if qos not in (0, 1) or isinstance(qos, bool):
        return f"qos {qos!r} is not 0 or 1"
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        return f"payload must be bytes, not {type(payload).__name__}"
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > MAX_PAYLOAD_BYTES:
        return f"payload is {size} bytes, more than {MAX_PAYLOAD_BYTES} (128 KB)"
    return check_topic(topic)


def check_level(what: str, value: str) -> str | None:
    """Why ``value`` cannot be one level of a topic, or None."""
    if not value:
        return f"{what} is empty"
    for bad in "/+#\x00":
        if bad in value:
            return f"{what} {value!r} contains {bad!r}, which cannot stand in a topic level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` by MQTT's rules: ``+`` one level, ``#`` the rest
    (or none); a wildcard at the first level does not take a topic starting with ``$``."""
    f, t = topic_filter.split("/"), topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)
