"""Checks of single config values that need more than a type and a range.

Each function returns the problem as the text that follows the value in a message
(``"is a directory, not a file"``), or None when the value is fine; :mod:`gateway.config`
puts the key path and the value in front. They look at the file system (``stat``, ``access``,
``/proc/self/mounts``) but never create, open or write anything, so :func:`gateway.config.validate`
stays safe on a Greengrass update that must not touch the device.
"""

from __future__ import annotations

import os
import stat
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from gateway.readings import MIN_TS_MS

#: File systems that hold no regular files (a SQLite buffer or a labels CSV cannot live there).
PSEUDO_FILE_SYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs", "pstore", "bpf",
    "configfs", "fusectl", "mqueue", "efivarfs", "binfmt_misc", "autofs", "nsfs", "hugetlbfs",
})
#: Trees refused whatever is mounted there: the kernel's interfaces, never storage.
PSEUDO_TREES = (Path("/proc"), Path("/sys"))

_KINDS = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket")]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat(path: Path) -> os.stat_result | str | None:
    """The path's stat, None when it does not exist, or the problem text."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"


def existing_file(path: Path) -> str | None:
    """A file the gateway will read: it exists, is a regular file and is readable."""
    st = _stat(path)
    if st is None:
        return "does not exist"
    if isinstance(st, str):
        return st
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file ({_kind(st.st_mode)})"
    if not os.access(path, os.R_OK):
        return "is not readable"
    return None


def existing_dir(path: Path) -> str | None:
    """A folder the gateway will read (a model folder)."""
    st = _stat(path)
    if st is None:
        return "does not exist"
    if isinstance(st, str):
        return st
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return "is not readable"
    return None


def _mounts() -> list[tuple[Path, str]]:
    """(mount point, file system type) of every mount, longest mount point first."""
    out = []
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    # mount points escape spaces and tabs in octal: \040, \011
                    point = fields[1].encode().decode("unicode_escape")
                    out.append((Path(point), fields[2]))
    except OSError:
        return []
    return sorted(out, key=lambda m: len(m[0].parts), reverse=True)


def _file_system(path: Path) -> tuple[Path, str] | None:
    for point, fstype in _mounts():
        if path == point or point in path.parents:
            return point, fstype
    return None


def writable_file(path: Path) -> str | None:
    """A file the gateway will create or append to (the buffer, a labels CSV).

    Either it exists as a writable regular file, or the nearest folder that exists can hold it;
    in both cases its folder must be writable too (SQLite creates ``-wal`` and ``-shm`` beside it).
    """
    real = Path(os.path.realpath(path))
    for tree in PSEUDO_TREES:
        if real == tree or tree in real.parents:
            return f"is under {tree}, which cannot hold a file"
    mount = _file_system(real)
    if mount is not None and mount[1] in PSEUDO_FILE_SYSTEMS:
        return f"is on {mount[0]}, a {mount[1]} file system, which cannot hold a file"
    st = _stat(real)
    if isinstance(st, str):
        return st
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return "is a directory, not a file"
        if not stat.S_ISREG(st.st_mode):
            return f"is not a regular file ({_kind(st.st_mode)})"
        if not os.access(real, os.R_OK | os.W_OK):
            return "is not writable"
    folder = real.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    verb = "cannot be written" if st is not None else "cannot be created"
    if not folder.is_dir():
        return f"{verb}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{verb}: {folder} is not writable"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{verb}: {folder} is on a read-only file system"
    except OSError as exc:
        return f"{verb}: {folder}: {exc.strerror}"
    return None


def shared_files(written: list[tuple[str, Path | None]],
                 read: list[tuple[str, Path | None]]) -> list[tuple[str, str]]:
    """(key path, other key path) for each file the gateway writes that another key also names.

    A labels CSV written into the buffer, or over a replay file, would destroy it. Paths are
    compared resolved (symbolic links, ``..``), so two spellings of one file are one file.
    """
    seen: dict[str, str] = {}
    out = []
    for where, path in written:
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            out.append((where, seen[real]))
        else:
            seen[real] = where
    for where, path in read:
        real = os.path.realpath(path) if path is not None else None
        if real in seen:
            out.append((seen[real], where))
    order = [where for where, _ in written]
    return sorted(out, key=lambda pair: order.index(pair[0]))  # stable: in the config's order


#: What a start time may be written as, for messages.
START_FORMAT = "an ISO 8601 date and time (2016-01-01T00:00:00Z)"


def start_ms(value: Any) -> int | str:
    """Epoch ms of a simulator ``start``, or the problem.

    Text is ISO 8601 (``Z`` or an offset; no offset means UTC). An unquoted YAML timestamp
    arrives as a datetime (naive = UTC, as YAML says) or a date (midnight UTC): both are taken.
    """
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return f"is not {START_FORMAT}"
    else:
        return f"must be {START_FORMAT} or null"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        ms = int(when.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):
        return f"is not {START_FORMAT}"
    if ms < MIN_TS_MS:
        return "is before 2000-01-01: every reading would be quarantined"
    return ms
