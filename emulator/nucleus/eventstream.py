"""The Amazon Event Stream framing, the bytes under Greengrass IPC.

Written from the specification (smithy ``docs/source-2.0/aws/amazon-eventstream.rst``). A
message is, all integers big-endian::

    total length (u32) | headers length (u32) | prelude CRC32 (u32)
    headers ... | payload ... | message CRC32 (u32)

The prelude CRC covers the first 8 bytes, the message CRC everything before it (both are
``zlib.crc32``). A header is ``name length (u8) | name (UTF-8) | type (u8) | value``; the value's
encoding depends on its type (:class:`HeaderType`): nothing for the two booleans, 1/2/4/8 bytes
for byte/int16/int32/int64 and timestamp (milliseconds since the epoch), a u16 length then the
bytes for byte arrays and strings, 16 bytes for a UUID.

Limits: 16 MiB a message, 128 KiB of headers, 127 bytes a header name. A frame that breaks any
rule raises :class:`FrameError` naming what was wrong; the stream cannot be resynchronised after
one, so the connection is closed.

:class:`Decoder` is incremental: feed it bytes as they arrive and it yields whole messages.
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
import uuid as _uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

MAX_MESSAGE = 16 * 1024 * 1024
MAX_HEADERS = 128 * 1024
MAX_HEADER_NAME = 127
PRELUDE = 12
MIN_MESSAGE = PRELUDE + 4

_U32x3 = struct.Struct(">III")
_U32 = struct.Struct(">I")


class FrameError(ValueError):
    """A frame that breaks the Event Stream encoding; the message says which rule and where."""


class HeaderType(enum.IntEnum):
    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    BYTE_BUF = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


_FIXED = {
    HeaderType.BYTE: struct.Struct(">b"),
    HeaderType.INT16: struct.Struct(">h"),
    HeaderType.INT32: struct.Struct(">i"),
    HeaderType.INT64: struct.Struct(">q"),
    HeaderType.TIMESTAMP: struct.Struct(">q"),
}
_U16 = struct.Struct(">H")


@dataclass(frozen=True)
class Header:
    """One header: its name, type and Python value.

    Values: ``bool`` for the booleans, ``int`` for the integers, ``bytes`` for BYTE_BUF, ``str``
    for STRING, an aware ``datetime`` for TIMESTAMP, ``uuid.UUID`` for UUID.
    """

    name: str
    type: HeaderType
    value: Any

    @classmethod
    def string(cls, name: str, value: str) -> Header:
        return cls(name, HeaderType.STRING, value)

    @classmethod
    def int32(cls, name: str, value: int) -> Header:
        return cls(name, HeaderType.INT32, value)

    @classmethod
    def boolean(cls, name: str, value: bool) -> Header:
        return cls(name, HeaderType.BOOL_TRUE if value else HeaderType.BOOL_FALSE, bool(value))


@dataclass
class Message:
    headers: list[Header] = field(default_factory=list)
    payload: bytes = b""

    def header(self, name: str, default: Any = None) -> Any:
        """The value of the first header called ``name`` (case-insensitive), or ``default``."""
        lowered = name.lower()
        for h in self.headers:
            if h.name.lower() == lowered:
                return h.value
        return default


def _encode_header(h: Header, out: bytearray) -> None:
    name = h.name.encode("utf-8")
    if not name or len(name) > MAX_HEADER_NAME:
        raise FrameError(f"header name {h.name!r} is {len(name)} bytes; it must be 1..{MAX_HEADER_NAME}")
    out.append(len(name))
    out += name
    t = HeaderType(h.type)
    if t in (HeaderType.BOOL_TRUE, HeaderType.BOOL_FALSE):
        # the type carries the value; a BOOL_TRUE header whose value says False is a caller's slip
        out.append(HeaderType.BOOL_TRUE if h.value else HeaderType.BOOL_FALSE)
        return
    out.append(t)
    if t in _FIXED:
        value = h.value
        if t is HeaderType.TIMESTAMP and isinstance(value, _dt.datetime):
            value = int(value.timestamp() * 1000)
        try:
            out += _FIXED[t].pack(value)
        except struct.error as exc:
            raise FrameError(f"header {h.name!r}: {value!r} does not fit a {t.name}") from exc
    elif t in (HeaderType.BYTE_BUF, HeaderType.STRING):
        raw = h.value.encode("utf-8") if t is HeaderType.STRING else bytes(h.value)
        if len(raw) > 0xFFFF:
            raise FrameError(f"header {h.name!r}: value is {len(raw)} bytes, more than 65535")
        out += _U16.pack(len(raw))
        out += raw
    elif t is HeaderType.UUID:
        raw = h.value.bytes if isinstance(h.value, _uuid.UUID) else bytes(h.value)
        if len(raw) != 16:
            raise FrameError(f"header {h.name!r}: a UUID is 16 bytes, not {len(raw)}")
        out += raw


def encode(headers: list[Header], payload: bytes = b"") -> bytes:
    """One message as bytes; raises :class:`FrameError` past a limit."""
    hbuf = bytearray()
    for h in headers:
        _encode_header(h, hbuf)
    if len(hbuf) > MAX_HEADERS:
        raise FrameError(f"headers are {len(hbuf)} bytes, more than {MAX_HEADERS}")
    total = MIN_MESSAGE + len(hbuf) + len(payload)
    if total > MAX_MESSAGE:
        raise FrameError(f"message is {total} bytes, more than {MAX_MESSAGE}")
    prelude = struct.pack(">II", total, len(hbuf))
    out = bytearray(prelude)
    out += _U32.pack(zlib.crc32(prelude))
    out += hbuf
    out += payload
    out += _U32.pack(zlib.crc32(out))
    return bytes(out)


def _decode_headers(buf: memoryview) -> list[Header]:
    headers = []
    i, end = 0, len(buf)
    while i < end:
        n = buf[i]
        i += 1
        if n == 0 or n > MAX_HEADER_NAME:
            raise FrameError(f"header name length {n} at header byte {i - 1}; it must be 1..{MAX_HEADER_NAME}")
        if i + n + 1 > end:
            raise FrameError(f"header at byte {i - 1} runs past the end of the headers")
        try:
            name = bytes(buf[i:i + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"header name at byte {i} is not UTF-8") from exc
        i += n
        raw_type = buf[i]
        i += 1
        try:
            t = HeaderType(raw_type)
        except ValueError:
            raise FrameError(f"header {name!r} has unknown value type {raw_type}") from None
        if t is HeaderType.BOOL_TRUE:
            value: Any = True
        elif t is HeaderType.BOOL_FALSE:
            value = False
        elif t in _FIXED:
            s = _FIXED[t]
            if i + s.size > end:
                raise FrameError(f"header {name!r}: {t.name} value runs past the end of the headers")
            (value,) = s.unpack_from(buf, i)
            i += s.size
            if t is HeaderType.TIMESTAMP:
                value = _dt.datetime.fromtimestamp(value / 1000, tz=_dt.timezone.utc)
        elif t in (HeaderType.BYTE_BUF, HeaderType.STRING):
            if i + 2 > end:
                raise FrameError(f"header {name!r}: value length runs past the end of the headers")
            (length,) = _U16.unpack_from(buf, i)
            i += 2
            if i + length > end:
                raise FrameError(f"header {name!r}: {length}-byte value runs past the end of the headers")
            raw = bytes(buf[i:i + length])
            i += length
            if t is HeaderType.STRING:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise FrameError(f"header {name!r}: string value is not UTF-8") from exc
            else:
                value = raw
        else:  # UUID
            if i + 16 > end:
                raise FrameError(f"header {name!r}: UUID runs past the end of the headers")
            value = _uuid.UUID(bytes=bytes(buf[i:i + 16]))
            i += 16
        headers.append(Header(name, t, value))
    return headers


def check_prelude(prelude: bytes) -> tuple[int, int]:
    """(total length, headers length) of a 12-byte prelude, or :class:`FrameError`."""
    total, hlen, crc = _U32x3.unpack_from(prelude)
    actual = zlib.crc32(prelude[:8])
    if crc != actual:
        raise FrameError(f"prelude CRC mismatch: frame says {crc:#010x}, bytes give {actual:#010x}")
    if total < MIN_MESSAGE:
        raise FrameError(f"message length {total} is shorter than the {MIN_MESSAGE}-byte minimum")
    if total > MAX_MESSAGE:
        raise FrameError(f"message length {total} is more than the {MAX_MESSAGE}-byte limit")
    if hlen > MAX_HEADERS:
        raise FrameError(f"headers length {hlen} is more than the {MAX_HEADERS}-byte limit")
    if hlen > total - MIN_MESSAGE:
        raise FrameError(f"headers length {hlen} does not fit a {total}-byte message")
    return total, hlen


def decode(frame: bytes) -> Message:
    """Exactly one whole message; raises :class:`FrameError` on any bad byte."""
    if len(frame) < MIN_MESSAGE:
        raise FrameError(f"frame is {len(frame)} bytes, shorter than the {MIN_MESSAGE}-byte minimum")
    total, hlen = check_prelude(frame[:PRELUDE])
    if total != len(frame):
        raise FrameError(f"prelude says {total} bytes but the frame has {len(frame)}")
    (crc,) = _U32.unpack_from(frame, total - 4)
    actual = zlib.crc32(memoryview(frame)[:total - 4])
    if crc != actual:
        raise FrameError(f"message CRC mismatch: frame says {crc:#010x}, bytes give {actual:#010x}")
    view = memoryview(frame)
    headers = _decode_headers(view[PRELUDE:PRELUDE + hlen])
    return Message(headers, bytes(view[PRELUDE + hlen:total - 4]))


class Decoder:
    """Incremental decoding: ``for msg in decoder.feed(chunk)``.

    After a :class:`FrameError` the decoder stays broken (every later feed raises the same
    error): a byte stream cannot be resynchronised once a length is untrustworthy.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> Iterator[Message]:
        if self._error is not None:
            raise self._error
        self._buf += data
        buf = self._buf
        start = 0
        try:
            while len(buf) - start >= PRELUDE:
                total, _ = check_prelude(bytes(buf[start:start + PRELUDE]))
                if len(buf) - start < total:
                    break
                msg = decode(bytes(buf[start:start + total]))
                start += total
                yield msg
        except FrameError as exc:
            self._error = exc
            raise
        finally:
            if start:
                del buf[:start]
