"""Every check a start runs, run before anything is created: ``preflight.check(config)``.

:func:`gateway.config.validate` checks the shape of a config and that the paths it names are
the right kind of file. A start then reads those files: the TLS certificate, key and CA (awscrt),
the model folder (onnxruntime and its golden vectors), the building metadata, the weather, the
CSV replays' headers and an existing buffer's schema. :func:`check` reads them the same way,
and raises one :class:`~gateway.errors.ConfigErrors` naming each problem by its key path::

    publisher.key: certs/gw.key does not match the certificate in publisher.cert (certs/gw.crt)
    model.path: /srv/models/x/model.onnx: cannot load: ...

It creates nothing (no buffer file, no folder) and connects nowhere, so ``gateway run --check``
runs it and says "ok" only for a config that starts; ``gateway run`` runs it before a start, so a
bad config never leaves a buffer file behind.
"""

from __future__ import annotations

import csv
import gzip
import re
import sqlite3
import ssl
import zlib
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError, ConfigErrors


def check(config: Config) -> None:
    """Raise ConfigErrors listing every problem a start of ``config`` would meet; else return."""
    errors: list[ConfigError] = []
    errors += _buffer(config)
    for i, spec in enumerate(config.sources):
        if spec["type"] == "replay":
            errors += _replay(config, i, spec["path"])
    if config.publisher.get("type") == "mqtt":
        errors += _tls(config)
    if config.model and config.model.get("enabled", True):
        errors += _model(config)
    if config.weather:
        errors += _weather(config)
    if errors:
        raise ConfigErrors(errors)


def _written(config: Config, section: str, key: str, path: Path, index: int | None = None) -> str:
    """A path as the config wrote it (messages quote the config), else as resolved."""
    raw: Any = config.raw.get(section)
    if index is not None:
        raw = raw[index] if isinstance(raw, list) and index < len(raw) else None
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, str) and value else str(path)


def _reason(exc: BaseException) -> str:
    """An exception's text without OpenSSL's "[LIB: CODE]" prefix and "(_ssl.c:123)" suffix."""
    text = str(exc.args[1] if isinstance(exc, ssl.SSLError) and len(exc.args) > 1 else exc)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
    return re.sub(r"^\[[^\]]*\]\s*", "", text) or type(exc).__name__


# ---------------------------------------------------------------- buffer


def _buffer(config: Config) -> list[ConfigError]:
    """An existing buffer file must be a gateway buffer this gateway's schema knows."""
    from gateway.buffer import MIGRATIONS

    path = config.buffer["path"]
    if not path.is_file() or path.stat().st_size == 0:  # validate() checked what it may be
        return []
    shown = _written(config, "buffer", "path", path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            done = {v for (v,) in db.execute("SELECT version FROM migrations")} if "migrations" in tables else set()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return [ConfigError("buffer.path", f"{shown} is not a SQLite buffer ({exc})")]
    if tables and not done:
        return [ConfigError("buffer.path", f"{shown} is a SQLite file but not a gateway buffer "
                                           f"(it has tables {', '.join(sorted(tables))})")]
    known = max(v for v, _, _ in MIGRATIONS)
    if done and max(done) > known:
        return [ConfigError("buffer.path", f"{shown} has schema version {max(done)}, newer than this gateway "
                                           f"knows ({known}); upgrade the gateway or point it at another "
                                           "buffer file")]
    return []


# ---------------------------------------------------------------- sources


#: The columns a readings CSV must have: the replay reader stops on a header without them.
REPLAY_COLUMNS = ("building_id", "meter", "timestamp", "meter_reading", "site_id")


def _replay(config: Config, i: int, path: Path) -> list[ConfigError]:
    """A CSV replay's header must have the required columns: the one thing that stops a replay
    (a damaged file or row is quarantined as it is read, never fatal)."""
    if path.name.lower().endswith((".json", ".json.gz")):
        return []
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            head = f.readline(1 << 17)
    except (OSError, EOFError, zlib.error):  # read as a rejected batch at run time
        return []
    if not head:
        return []  # an empty file is a replay that is done
    try:
        names = next(csv.reader([head.rstrip("\r\n")]), [])
    except csv.Error:
        names = []
    missing = [c for c in REPLAY_COLUMNS if c not in names]
    if missing:
        shown = _written(config, "sources", "path", path, index=i)
        return [ConfigError(f"sources[{i}].path", f"{shown}: no column {', '.join(missing)} in the header")]
    return []


# ---------------------------------------------------------------- publisher


def _tls(config: Config) -> list[ConfigError]:
    """The certificate, key and CA, loaded by OpenSSL and then by awscrt, as a start loads them."""
    p = config.publisher
    shown = {k: _written(config, "publisher", k, p[k]) for k in ("cert", "key", "ca")}
    errors: list[ConfigError] = []

    def certificates(key: str, what: str) -> bool:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(p[key]))
        except ssl.SSLError as exc:
            problem = "holds no PEM certificate" if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else (
                f"is not a usable certificate ({_reason(exc)})")
            errors.append(ConfigError(f"publisher.{key}", f"{shown[key]} {problem}{what}"))
            return False
        except OSError as exc:
            errors.append(ConfigError(f"publisher.{key}", f"{shown[key]} cannot be read: {exc.strerror}"))
            return False
        return True

    cert_ok = certificates("cert", "")
    certificates("ca", " to trust")
    if cert_ok:
        encrypted = []

        def password() -> bytes:
            encrypted.append(True)
            return b""

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(p["cert"]), str(p["key"]), password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problem = f"does not match the certificate in publisher.cert ({shown['cert']})"
            elif encrypted:
                problem = "is encrypted; the gateway needs an unencrypted private key"
            else:
                problem = "is not a PEM private key"
            errors.append(ConfigError("publisher.key", f"{shown['key']} {problem}"))
        except OSError as exc:
            errors.append(ConfigError("publisher.key", f"{shown['key']} cannot be read: {exc.strerror}"))
    else:
        key_text = p["key"].read_bytes()[:1 << 20] if p["key"].is_file() else b""
        if b"PRIVATE KEY-----" not in key_text:
            errors.append(ConfigError("publisher.key", f"{shown['key']} is not a PEM private key"))
    if errors:
        order = ["publisher.cert", "publisher.key", "publisher.ca"]
        return sorted(errors, key=lambda e: order.index(e.path))
    try:  # what MqttPublisher's constructor does, minus the client: the TLS context
        from awscrt import io as crt_io

        options = crt_io.TlsContextOptions.create_client_with_mtls_from_path(str(p["cert"]), str(p["key"]))
        options.override_default_trust_store_from_path(None, str(p["ca"]))
        crt_io.ClientTlsContext(options)
    except Exception as exc:  # awscrt raises AwsCrtError, RuntimeError or OSError for what OpenSSL took
        return [ConfigError("publisher.cert", f"awscrt cannot load {shown['cert']}, {shown['key']} and "
                                              f"{shown['ca']}: {exc}")]
    return []


# ---------------------------------------------------------------- scoring


def _model(config: Config) -> list[ConfigError]:
    """The model folder passes every check a hot swap runs; the building metadata loads."""
    from gateway.errors import ModelError
    from gateway.model.features import Buildings
    from gateway.model.scorer import Scorer

    m = config.model
    errors = []
    try:
        Scorer(m["path"], intra_op_threads=m["threads"])
    except ModelError as exc:
        errors.append(ConfigError("model.path", str(exc)))
    try:
        Buildings.from_csv(m["buildings"])
    except ModelError as exc:
        errors.append(ConfigError("model.buildings", str(exc)))
    return errors


def _weather(config: Config) -> list[ConfigError]:
    """The weather file loads as a start loads it."""
    from gateway.sources.weather import WeatherReplay

    path = config.weather["path"]
    shown = _written(config, "weather", "path", path)
    try:
        WeatherReplay(path).table(retain_ms=None)
    except (OSError, EOFError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        text = _reason(exc).removeprefix(f"{path}: ")
        return [ConfigError("weather.path", f"{shown} cannot be loaded: {text}")]
    return []
