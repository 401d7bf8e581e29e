"""The JSON messages the gateway publishes.

A raw message carries up to 100 readings of one site::

    {"batch": "9f2c61d0a4b7e311", "thing": "gw-1", "site": "15", "n": 2,
     "readings": [["1433:electricity", 1483246800000, 41.35], ...]}

Each reading is ``[meter, ts, value]``: its (meter, ts) pair is its key, so the cloud can drop
the duplicates that a replay after a crash produces. ``batch`` is derived from the message's
readings, so a resent message carries the same id. A scored message has the same shape, each
reading ``[meter, ts, value, expected, score, flag]`` and a top-level ``"model"`` version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator, Sequence

from gateway.topics import MAX_PAYLOAD_BYTES

RAW_FIELDS = ("meter", "ts", "value")
SCORED_FIELDS = ("meter", "ts", "value", "expected", "score", "flag")

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode(thing: str, site: str, rows: Sequence[Sequence], model: str | None = None) -> bytes:
    """One message's payload. ``rows`` are lists in RAW_FIELDS or SCORED_FIELDS order."""
    body = _dumps(rows)
    batch = hashlib.blake2b(body.encode(), digest_size=8).hexdigest()
    head = f'{{"batch":"{batch}","thing":{_dumps(thing)},"site":{_dumps(site)},"n":{len(rows)},'
    if model is not None:
        head += f'"model":{_dumps(model)},'
    return f'{head}"readings":{body}}}'.encode()


def chunks(
    thing: str, site: str, rows: list, size: int, model: str | None = None
) -> Iterator[tuple[bytes, list]]:
    """Payloads of at most ``size`` readings and at most 128 KB each, with their rows.

    A chunk over 128 KB is halved until it fits; a single reading that does not fit is
    yielded as is, for the caller to quarantine.
    """
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        stack = [part]
        while stack:
            part = stack.pop()
            payload = encode(thing, site, part, model)
            if len(payload) > MAX_PAYLOAD_BYTES and len(part) > 1:
                half = len(part) // 2
                stack.append(part[half:])
                stack.append(part[:half])
                continue
            yield payload, part


def decode(payload: bytes) -> dict:
    """Parse a message (for tests, the demo and the local cloud)."""
    return json.loads(payload)
