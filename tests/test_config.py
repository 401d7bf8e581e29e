"""The config validator: a corpus of bad configs and the exact message each one gets.

Every case is YAML text written next to a ``readings.csv`` in tmp_path and loaded with
:func:`gateway.config.load`, so relative paths resolve against the config's folder as they do
in production. Messages name the key path, the bad value (as written) and what is allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gateway import preflight
from gateway.config import Config, load, validate
from gateway.errors import ConfigError, ConfigErrors

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "ashrae-lgbm"
WEATHER = REPO / "data" / "sample" / "weather_2016.json.gz"

MINIMAL = """\
thing: gw-test-01
sources:
  - type: replay
    path: readings.csv
publisher: {type: memory}
"""

TOP_KEYS = "app, buffer, forwarder, log_level, model, publisher, sources, thing, weather"
BUFFER_KEYS = "budget_mb, live_window_s, path, policy, synchronous"
REPLAY_KEYS = "batch_size, name, path, speed, type"
FORWARDER_KEYS = ("ack_timeout_s, auth_retry_s, backoff_max_s, backoff_min_s, basic_ingest_rule, batch_size, "
                  "claim_size, window")


@pytest.fixture
def folder(tmp_path) -> Path:
    """A config folder holding the replay file that MINIMAL points at (and the files the modbus cases name)."""
    (tmp_path / "readings.csv").write_text("building_id,meter,timestamp,meter_reading,site_id\n")
    (tmp_path / "bad-map.yaml").write_text("maker: X\nmodel: Y\ndocument: Z\nregisters:\n"
                                           "  - {name: e, type: input, address: 0, data_type: f16, unit: kWh, "
                                           "meaning: energy}\n")
    (tmp_path / "devices.csv").write_text("name,map,host,unit_id,site,building,max_power_kw\n"
                                          "a,eastron-sdm630,h,1,0,1,50\nb,eastron-sdm630,h,300,0,1,\n"
                                          "a,schneider-iem3000,h,2,0,2,lots\n")
    (tmp_path / "columns.csv").write_text("map,host,unitid,site,building\n")
    return tmp_path


def write(folder: Path, text: str, name: str = "gw.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def errors(folder: Path, text: str) -> list[str]:
    """The messages of the ConfigErrors that ``text`` raises, in order."""
    with pytest.raises(ConfigErrors) as info:
        load(write(folder, text))
    assert str(info.value) == "\n".join(str(e) for e in info.value.errors)
    return [str(e) for e in info.value.errors]


def exactly(message: str) -> str:
    return rf"^{re.escape(message)}$"


# ---------------------------------------------------------------- a good config


def test_minimal_config_fills_defaults(folder):
    config = load(write(folder, MINIMAL))
    assert isinstance(config, Config)
    assert (config.thing, config.app, config.log_level) == ("gw-test-01", "meters", "INFO")
    assert config.base == folder.resolve()
    assert config.buffer == {
        "path": folder.resolve() / "var/buffer.db",
        "budget_bytes": 1024 * 2**20,
        "policy": "drop_oldest",
        "live_window_ms": 300_000,
        "synchronous": "full",
    }
    assert config.sources == [
        {"type": "replay", "name": "replay", "path": folder.resolve() / "readings.csv", "speed": None,
         "batch_size": 1000},
    ]
    assert config.publisher == {"type": "memory"}
    assert config.forwarder == {"batch_size": 100, "claim_size": 1000, "window": 64, "ack_timeout_s": 30,
                                "backoff_min_s": 0.5, "backoff_max_s": 60, "auth_retry_s": 300,
                                "basic_ingest_rule": None}
    assert config.model is None and config.weather is None


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(folder, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    (folder / "certs").mkdir()
    for name in ("gw.crt", "gw.key", "ca.crt"):
        (folder / "certs" / name).write_text("pem")
    absolute = folder / "readings.csv"
    config = load(write(folder, f"""\
thing: gw-test-01
buffer: {{path: state/buf.db, budget_mb: 1.5, policy: reject_newest, live_window_s: 1.5}}
sources:
  - {{type: replay, name: a, path: readings.csv, speed: 3600}}
  - {{type: replay, name: b, path: {absolute}}}
  - {{type: simulator, labels_path: out/labels.csv}}
publisher: {{type: mqtt, endpoint: localhost, cert: certs/gw.crt, key: certs/gw.key, ca: certs/ca.crt}}
"""))
    base = folder.resolve()
    assert config.buffer["path"] == base / "state/buf.db"
    assert (config.buffer["budget_bytes"], config.buffer["policy"]) == (3 * 2**19, "reject_newest")
    assert config.buffer["live_window_ms"] == 1500
    assert [s["path"] for s in config.sources[:2]] == [base / "readings.csv", absolute]
    assert config.sources[0]["speed"] == 3600.0 and isinstance(config.sources[0]["speed"], float)
    sim = config.sources[2]
    assert (sim["name"], sim["meters"], sim["interval_s"], sim["speed"], sim["seed"], sim["count"]) == (
        "simulator", 2380, 60, 1.0, 1, None)
    assert sim["labels_path"] == base / "out/labels.csv"  # need not exist yet
    assert sim["start_ms"] is None  # now, when the source is built
    assert not (folder / "state").exists() and not (folder / "out").exists()  # checked, not created
    assert config.publisher == {"type": "mqtt", "endpoint": "localhost", "port": 8883, "local": False, "client_id": None,
                                "cert": base / "certs/gw.crt", "key": base / "certs/gw.key",
                                "ca": base / "certs/ca.crt"}


def test_a_thing_name_of_exactly_128_characters_is_allowed(folder):
    assert load(write(folder, MINIMAL.replace("gw-test-01", "x" * 128))).thing == "x" * 128


def test_validate_checks_an_already_parsed_update(folder):
    """The Greengrass path: a dict, no file; paths still resolve against ``base``."""
    raw = {"thing": "gw-1", "sources": [{"type": "replay", "path": "readings.csv"}], "publisher": {"type": "memory"}}
    assert validate(raw, base=folder).sources[0]["path"] == folder / "readings.csv"
    raw["forwarder"] = {"window": 0}
    with pytest.raises(ConfigErrors, match=exactly("forwarder.window: 0 is out of range 1..10000")):
        validate(raw, base=folder)


# ---------------------------------------------------------------- the bad-config corpus


def sim(keys: str) -> str:
    """MINIMAL with a second source, a simulator with ``keys`` (YAML flow-mapping entries)."""
    return MINIMAL.replace("publisher:", f"  - {{type: simulator, {keys}}}\npublisher:")


def mqtt(keys: str) -> str:
    """MINIMAL with an mqtt publisher whose files all exist, then ``keys`` (flow-mapping entries)."""
    files = {"cert": "readings.csv", "key": "readings.csv", "ca": "readings.csv"}
    for entry in keys.split(", "):
        files.pop(entry.split(":")[0], None)
    given = ", ".join([f"{k}: {v}" for k, v in files.items()] + [keys])
    return MINIMAL.replace("{type: memory}", f"{{type: mqtt, endpoint: localhost, {given}}}")


GOOD_DEVICE = "  - {map: eastron-sdm630, host: h, unit_id: 1, site: '0', building: '1'}\n"


def modbus(devices: str | None, extra: str = "") -> str:
    """MINIMAL with a second source, a modbus one with ``devices`` (YAML list items) and ``extra`` keys."""
    text = "  - type: modbus\n"
    if extra:
        text += f"    {extra}\n"
    if devices is not None:
        text += "    devices:\n" + "".join("    " + line + "\n" for line in devices.splitlines())
    return MINIMAL.replace("publisher:", text + "publisher:")


CASES = [
    # missing required sections
    ("missing-required", "app: meters\n",
     ["publisher: is required", "sources: is required", "thing: is required"]),
    ("null-section", MINIMAL.replace("publisher: {type: memory}", "publisher:"),
     ["publisher.type: is required: one of mqtt, memory, ipc"]),
    ("publisher-without-type", MINIMAL.replace("{type: memory}", "{}"),
     ["publisher.type: is required: one of mqtt, memory, ipc"]),
    ("publisher-unknown-type", MINIMAL.replace("{type: memory}", "{type: kafka}"),
     ["publisher.type: 'kafka' is not one of mqtt, memory, ipc"]),
    ("ipc-bad-keys", MINIMAL.replace("{type: memory}", "{type: ipc, delivery: acked, receipt_timeout_s: 0, "
                                                       "endpoint: x}"),
     ["publisher.endpoint: unknown key (allowed: delivery, receipt_timeout_s, type)",
      "publisher.delivery: 'acked' is not one of handoff, receipt", "publisher.receipt_timeout_s: 0 must be > 0"]),
    ("ipc-receipt-timeout-as-text", MINIMAL.replace("{type: memory}", "{type: ipc, receipt_timeout_s: '60'}"),
     ["publisher.receipt_timeout_s: '60' must be a number (YAML reads it as text: drop any quotes, and write an "
      "exponent with its sign: 1.0e+5)"]),
    ("ipc-receipt-timeout-too-long", MINIMAL.replace("{type: memory}", "{type: ipc, receipt_timeout_s: 86401}"),
     ["publisher.receipt_timeout_s: 86401 must be <= 86400"]),
    ("receipt-through-basic-ingest",
     MINIMAL.replace("{type: memory}", "{type: ipc, delivery: receipt}") + "forwarder: {basic_ingest_rule: meters_raw}\n",
     ["forwarder.basic_ingest_rule: 'meters_raw' with publisher.delivery: receipt: a message sent through Basic "
      "Ingest reaches only its rule, not the receipt rule, so no receipt would ever come (use delivery: handoff, "
      "or no Basic Ingest)"]),
    ("mqtt-client-id", mqtt("client_id: ''"), ["publisher.client_id: '' must not be empty"]),
    ("mqtt-client-id-too-long", mqtt("client_id: " + "c" * 129),
     [f"publisher.client_id: '{'c' * 129}' is 129 bytes long; IoT Core allows at most 128"]),
    ("mqtt-missing-keys", MINIMAL.replace("{type: memory}", "{type: mqtt, endpoint: '', port: 70000, cert: c.pem}"),
     ["publisher.ca: is required", "publisher.key: is required", "publisher.endpoint: '' must not be empty",
      "publisher.port: 70000 is out of range 1..65535", "publisher.cert: c.pem does not exist"]),
    ("source-without-type", MINIMAL.replace("  - type: replay\n    path", "  - path"),
     ["sources[0].type: is required: one of replay, simulator, modbus"]),
    ("source-unknown-type", MINIMAL.replace("type: replay", "type: bacnet"),
     ["sources[0].type: 'bacnet' is not one of replay, simulator, modbus"]),
    # modbus devices and register maps
    ("modbus-without-devices", modbus(None), ["sources[1].devices: is required (or devices_csv): the meters to poll"]),
    ("modbus-unit-id-out-of-range", modbus(GOOD_DEVICE * 3 + GOOD_DEVICE.replace("unit_id: 1", "unit_id: 300")),
     ["sources[1].devices[1].name: 'h#1' is already the name of sources[1].devices[0]",
      "sources[1].devices[1].unit_id: 1 is already the unit_id of sources[1].devices[0] on the same line",
      "sources[1].devices[2].name: 'h#1' is already the name of sources[1].devices[0]",
      "sources[1].devices[2].unit_id: 1 is already the unit_id of sources[1].devices[0] on the same line",
      "sources[1].devices[3].unit_id: 300 is out of range 1..247"]),
    ("modbus-device-keys", modbus(GOOD_DEVICE.replace("unit_id: 1", "unit_id: 2, meter: gas, port: 0, parity: X, "
                                                                    "transport: udp, max_power_kw: -1, uint_id: 3")),
     ["sources[1].devices[0].uint_id: unknown key; did you mean 'unit_id'? (allowed: baudrate, building, bytesize, "
      "energy, host, map, max_power_kw, meter, name, parity, port, registers, retries, serial, site, stopbits, "
      "timeout_s, transport, unit_id)",
      "sources[1].devices[0].meter: 'gas' is not one of electricity, chilledwater, steam, hotwater",
      "sources[1].devices[0].port: 0 is out of range 1..65535",
      "sources[1].devices[0].parity: 'X' is not one of N, E, O",
      "sources[1].devices[0].max_power_kw: -1 must be > 0",
      "sources[1].devices[0].transport: 'udp' is not one of tcp, rtu-over-tcp, rtu"]),
    ("modbus-required-device-keys", modbus("  - {host: h}\n"),
     ["sources[1].devices[0].building: is required", "sources[1].devices[0].map: is required",
      "sources[1].devices[0].site: is required", "sources[1].devices[0].unit_id: is required"]),
    ("modbus-rtu-needs-serial", modbus(GOOD_DEVICE.replace("host: h", "transport: rtu")),
     ["sources[1].devices[0].serial: is required with transport rtu (the serial port, e.g. /dev/ttyUSB0)"]),
    ("modbus-one-serial-line-one-setting",
     modbus(GOOD_DEVICE.replace("host: h", "serial: /dev/ttyS9")
            + GOOD_DEVICE.replace("host: h", "serial: /dev/ttyS9, baudrate: 19200").replace("unit_id: 1", "unit_id: 2")),
     ["sources[1].devices[1].baudrate: 19200 differs from sources[1].devices[0]'s 9600 on the same serial line "
      "/dev/ttyS9 (one bus, one setting)"]),
    ("modbus-unknown-map", modbus(GOOD_DEVICE.replace("eastron-sdm630", "eastron-sdm63")),
     ["sources[1].devices[0].map: 'eastron-sdm63' is not a shipped register map (shipped: carlo-gavazzi-em24, "
      "eastron-sdm630, schneider-iem3000) nor a map file"]),
    ("modbus-map-register-names", modbus(GOOD_DEVICE.replace("unit_id: 1", "unit_id: 1, energy: total_system_power, "
                                                                           "registers: [total_kwh, volts]")),
     ["sources[1].devices[0].energy: 'total_system_power' is a power register, not an energy counter",
      "sources[1].devices[0].registers[1]: 'volts' is not a register of eastron-sdm630 (it has: total_import_kwh, "
      "total_kwh, total_system_power)"]),
    ("modbus-bad-map-file", modbus(GOOD_DEVICE.replace("eastron-sdm630", "bad-map.yaml")),
     ["sources[1].devices[0].map: 'bad-map.yaml': bad-map.yaml: registers[0].data_type: 'f16' is not one of u16, "
      "i16, u32, i32, u64, f32, f64"]),
    ("modbus-missing-map-file", modbus(GOOD_DEVICE.replace("eastron-sdm630", "maps/none.yaml")),
     ["sources[1].devices[0].map: 'maps/none.yaml': {folder}/maps/none.yaml: register map: no such file"]),
    ("modbus-devices-csv", modbus(None, "devices_csv: devices.csv"),
     ["devices.csv:3.unit_id: 300 is out of range 1..247",
      "devices.csv:4.max_power_kw: 'lots' must be a number or null",
      "devices.csv:4.name: 'a' is already the name of devices.csv:2"]),
    ("modbus-devices-csv-bad-column", modbus(None, "devices_csv: columns.csv"),
     ["columns.csv:1: column 'unitid' is not a device key; did you mean 'unit_id'? (allowed: baudrate, building, "
      "bytesize, energy, host, map, max_power_kw, meter, name, parity, port, registers, retries, serial, site, "
      "stopbits, timeout_s, transport, unit_id)"]),
    ("modbus-devices-csv-missing", modbus(None, "devices_csv: nope.csv"),
     ["sources[1].devices_csv: nope.csv does not exist"]),
    ("replay-without-path", MINIMAL.replace("    path: readings.csv\n", ""),
     ["sources[0].path: is required"]),
    # unknown keys, with a suggestion when one is close
    ("typo-top-level", MINIMAL + "log_levl: DEBUG\n",
     [f"log_levl: unknown key; did you mean 'log_level'? (allowed: {TOP_KEYS})"]),
    ("typo-nested", MINIMAL + "buffer: {polcy: drop_oldest}\n",
     [f"buffer.polcy: unknown key; did you mean 'policy'? (allowed: {BUFFER_KEYS})"]),
    ("typo-in-a-list-item", MINIMAL.replace("path: readings.csv", "path: readings.csv\n    sped: 10"),
     [f"sources[0].sped: unknown key; did you mean 'speed'? (allowed: {REPLAY_KEYS})"]),
    ("unknown-nothing-close", MINIMAL + "forwarder: {colour: red}\n",
     [f"forwarder.colour: unknown key (allowed: {FORWARDER_KEYS})"]),
    ("key-of-another-publisher-type", MINIMAL.replace("{type: memory}", "{type: memory, endpoint: localhost}"),
     ["publisher.endpoint: unknown key (allowed: type)"]),
    # wrong types, shown as written in YAML
    ("string-where-int", MINIMAL + "forwarder: {batch_size: '50'}\n",
     ["forwarder.batch_size: '50' must be an integer (YAML reads it as text: drop any quotes)"]),
    ("bool-where-int", MINIMAL + "forwarder: {window: true}\n",
     ["forwarder.window: true must be an integer"]),
    ("float-where-int", MINIMAL + "forwarder: {claim_size: 1.5}\n",
     ["forwarder.claim_size: 1.5 must be an integer"]),
    ("bool-where-number", MINIMAL.replace("path: readings.csv", "path: readings.csv\n    speed: yes"),
     ["sources[0].speed: true must be a number or null"]),
    ("word-where-number", MINIMAL.replace("path: readings.csv", "path: readings.csv\n    speed: fast"),
     ["sources[0].speed: 'fast' must be a number or null"]),
    ("exponent-without-sign", MINIMAL.replace("path: readings.csv", "path: readings.csv\n    speed: 1e5"),
     ["sources[0].speed: '1e5' must be a number or null (YAML reads it as text: drop any quotes, "
      "and write an exponent with its sign: 1.0e+5)"]),
    ("int-where-string", MINIMAL.replace("gw-test-01", "12"), ["thing: 12 must be a string"]),
    ("null-where-string", MINIMAL.replace("thing: gw-test-01", "thing:"), ["thing: null must be a string"]),
    ("list-where-mapping", MINIMAL + "buffer: [path, var/b.db]\n",
     ["buffer: [path, var/b.db] must be a mapping"]),
    ("string-where-mapping", MINIMAL.replace("publisher: {type: memory}", "publisher: memory"),
     ["publisher: 'memory' must be a mapping"]),
    ("string-where-list-item", MINIMAL.replace("  - type: replay\n    path: readings.csv", "  - readings.csv"),
     ["sources[0]: 'readings.csv' must be a mapping"]),
    ("mapping-where-list", MINIMAL.replace("  - type: replay\n    path: readings.csv",
                                           "  type: replay\n  path: readings.csv"),
     ["sources: {type: replay, path: readings.csv} must be a non-empty list"]),
    ("empty-list", MINIMAL.replace("  - type: replay\n    path: readings.csv", "  []"),
     ["sources: [] must be a non-empty list"]),
    # values out of range or not allowed
    ("batch-size-too-big", MINIMAL + "forwarder: {batch_size: 101}\n",
     ["forwarder.batch_size: 101 is out of range 1..100"]),
    ("batch-size-zero", MINIMAL + "forwarder: {batch_size: 0}\n",
     ["forwarder.batch_size: 0 is out of range 1..100"]),
    ("big-bounds-read-as-integers", MINIMAL.replace("publisher:", "  - {type: simulator, meters: 0, anomaly_rate: 1.5}"
                                                                  "\npublisher:"),
     ["sources[1].meters: 0 is out of range 1..1000000", "sources[1].anomaly_rate: 1.5 is out of range 0..1"]),
    ("negative-float", MINIMAL + "buffer: {live_window_s: -0.5, budget_mb: 0}\n",
     ["buffer.budget_mb: 0 is out of range 1..1048576", "buffer.live_window_s: -0.5 must be > 0"]),
    ("policy-not-allowed", MINIMAL + "buffer: {policy: drop_newest}\n",
     ["buffer.policy: 'drop_newest' is not one of drop_oldest, reject_newest"]),
    ("log-level-is-case-sensitive", MINIMAL + "log_level: info\n",
     ["log_level: 'info' is not one of DEBUG, INFO, WARNING, ERROR"]),
    # files that must exist
    ("replay-file-missing", MINIMAL.replace("path: readings.csv", "path: nope.csv"),
     ["sources[0].path: nope.csv does not exist"]),
    ("model-and-weather-files", MINIMAL + "model: {buildings: readings.csv}\nweather: {path: w.json}\n",
     ["model.path: is required", "weather.path: w.json does not exist"]),
    # cross-field checks
    ("duplicate-default-names", MINIMAL.replace("publisher:", "  - {type: replay, path: readings.csv}\npublisher:"),
     ["sources[1].name: 'replay' is already the name of sources[0] "
      "(a source's name defaults to its type: give each source a name)"]),
    ("duplicate-explicit-names", MINIMAL.replace("path: readings.csv", "path: readings.csv\n    name: a").replace(
        "publisher:", "  - {type: simulator, name: b}\n  - {type: simulator, name: a}\npublisher:"),
     ["sources[2].name: 'a' is already the name of sources[0]"]),
    ("backoff-max-below-min", MINIMAL + "forwarder: {backoff_min_s: 5, backoff_max_s: 2}\n",
     ["forwarder.backoff_max_s: 2 must be >= backoff_min_s (5)"]),
    ("backoff-min-above-default-max", MINIMAL + "forwarder: {backoff_min_s: 90.5}\n",
     ["forwarder.backoff_max_s: 60 (the default) must be >= backoff_min_s (90.5)"]),
    # keys nothing reads are refused like any unknown key
    ("sites-is-read-by-nothing", MINIMAL + "sites: 42\n",
     [f"sites: unknown key (allowed: {TOP_KEYS})"]),
    # a simulator's start: ISO 8601 text, or an unquoted YAML timestamp (see the good cases)
    ("start-not-a-date", sim("start: not a date"),
     ["sources[1].start: 'not a date' is not an ISO 8601 date and time (2016-01-01T00:00:00Z)"]),
    ("start-year-10000", sim("start: 10000-01-01"),
     ["sources[1].start: '10000-01-01' is not an ISO 8601 date and time (2016-01-01T00:00:00Z)"]),
    ("start-before-2000", sim("start: 1999-12-31T23:59:59Z"),
     ["sources[1].start: 1999-12-31 23:59:59+00:00 is before 2000-01-01: every reading would be quarantined"]),
    ("start-a-number", sim("start: 1451606400000"),
     ["sources[1].start: 1451606400000 must be an ISO 8601 date and time (2016-01-01T00:00:00Z) or null"]),
    # what the constructors used to be the first to check
    ("seed-negative", sim("seed: -1"), ["sources[1].seed: -1 is out of range 0..4294967295"]),
    ("seed-too-big", sim("seed: 4294967296"), ["sources[1].seed: 4294967296 is out of range 0..4294967295"]),
    ("interval-too-short", sim("interval_s: 0.0001"), ["sources[1].interval_s: 0.0001 is out of range 1..86400"]),
    ("interval-too-long", sim("interval_s: 86401"), ["sources[1].interval_s: 86401 is out of range 1..86400"]),
    ("interval-not-whole-ms", sim("interval_s: 1.0005"),
     ["sources[1].interval_s: 1.0005 must be a whole number of milliseconds"]),
    # numbers must be finite, and durations must end
    ("inf-and-nan", MINIMAL + "buffer: {budget_mb: .inf, live_window_s: .nan}\nweather: {path: readings.csv, "
                              "max_age_s: .inf}\nforwarder: {ack_timeout_s: .inf}\n",
     ["buffer.budget_mb: .inf must be a finite number", "buffer.live_window_s: .nan must be a finite number",
      "forwarder.ack_timeout_s: .inf must be a finite number", "weather.max_age_s: .inf must be a finite number"]),
    ("inf-speeds-and-threshold", sim("speed: .inf, anomaly_rate: .nan").replace(
        "readings.csv\n", "readings.csv\n    speed: -.inf\n", 1) + "model: {path: ., buildings: readings.csv, "
                                                                     "threshold: .nan}\n",
     ["sources[0].speed: -.inf must be a finite number", "sources[1].speed: .inf must be a finite number",
      "sources[1].anomaly_rate: .nan must be a finite number", "model.threshold: .nan must be a finite number"]),
    ("durations-that-never-end", MINIMAL + "buffer: {live_window_s: 1.0e+300}\nweather: {path: readings.csv, "
                                           "max_age_s: 31536001}\nforwarder: {backoff_max_s: 86401}\n",
     ["buffer.live_window_s: 1e+300 must be <= 31536000", "forwarder.backoff_max_s: 86401 must be <= 86400",
      "weather.max_age_s: 31536001 must be <= 31536000"]),
    ("budget-below-the-floor", MINIMAL + "buffer: {budget_mb: 1.0e-9}\n",
     ["buffer.budget_mb: 1e-09 is out of range 1..1048576"]),
    # paths: the right kind of file, and a file the gateway writes must be creatable
    ("buffer-under-proc", MINIMAL + "buffer: {path: /proc/gw/buffer.db}\n",
     ["buffer.path: /proc/gw/buffer.db is under /proc, which cannot hold a file"]),
    ("buffer-under-sys", MINIMAL + "buffer: {path: /sys/buffer.db}\n",
     ["buffer.path: /sys/buffer.db is under /sys, which cannot hold a file"]),
    ("buffer-is-a-directory", MINIMAL + "buffer: {path: .}\n", ["buffer.path: . is a directory, not a file"]),
    ("buffer-is-a-device", MINIMAL + "buffer: {path: /dev/null}\n",
     ["buffer.path: /dev/null is not a regular file (a character device)"]),
    ("buffer-under-a-file", MINIMAL + "buffer: {path: readings.csv/buffer.db}\n",
     ["buffer.path: readings.csv/buffer.db cannot be created: {folder}/readings.csv is not a directory"]),
    ("labels-under-proc", sim("labels_path: /proc/labels.csv"),
     ["sources[1].labels_path: /proc/labels.csv is under /proc, which cannot hold a file"]),
    ("replay-is-a-directory", MINIMAL.replace("path: readings.csv", "path: ."),
     ["sources[0].path: . is a directory, not a file"]),
    ("replay-path-empty", MINIMAL.replace("path: readings.csv", "path: ''"),
     ["sources[0].path: '' must not be empty"]),
    ("tls-files-are-directories", mqtt("cert: ., key: ., ca: /"),
     ["publisher.cert: . is a directory, not a file", "publisher.key: . is a directory, not a file",
      "publisher.ca: / is a directory, not a file"]),
    ("tls-file-empty-path", mqtt("ca: ''"), ["publisher.ca: '' must not be empty"]),
    ("model-path-is-a-file", MINIMAL + "model: {path: readings.csv, buildings: .}\n",
     ["model.path: readings.csv is not a directory", "model.buildings: . is a directory, not a file"]),
    ("weather-is-a-directory", MINIMAL + "weather: {path: .}\n", ["weather.path: . is a directory, not a file"]),
    # a file the gateway writes must be no other key's file
    ("labels-over-a-replay-and-the-buffer", sim("name: a, labels_path: readings.csv").replace(
        "publisher:", "  - {type: simulator, name: b, labels_path: ./var/../var/buffer.db}\npublisher:"),
     ["sources[1].labels_path: readings.csv is also sources[0].path: the gateway would write over it",
      "sources[2].labels_path: ./var/../var/buffer.db is also buffer.path: the gateway would write over it"]),
    ("buffer-over-the-weather", MINIMAL + "buffer: {path: readings.csv}\nweather: {path: readings.csv}\n",
     ["buffer.path: readings.csv is also sources[0].path: the gateway would write over it",
      "buffer.path: readings.csv is also weather.path: the gateway would write over it"]),
    # the shape of the whole file
    ("top-level-list", "- thing: gw-test-01\n- publisher: {type: memory}\n",
     ["top level: [{thing: gw-test-01}, {publisher: {type: memory}}] must be a mapping"]),
    ("top-level-scalar", "gw-test-01\n", ["top level: 'gw-test-01' must be a mapping"]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_with_exact_messages(folder, text, expected):
    before = set(folder.rglob("*"))
    assert errors(folder, text) == [e.replace("{folder}", str(folder.resolve())) for e in expected]
    assert set(folder.rglob("*")) == before | {folder / "gw.yaml"}  # nothing created, no buffer


@pytest.mark.parametrize(("thing", "message"), [
    ("gw/01", "thing: 'gw/01' contains '/', which cannot stand in a topic level"),
    ("gw+01", "thing: 'gw+01' contains '+', which cannot stand in a topic level"),
    ("'gw#01'", "thing: 'gw#01' contains '#', which cannot stand in a topic level"),
    ("''", "thing: '' must not be empty"),
    ("x" * 129, f"thing: '{'x' * 129}' is 129 characters long; IoT Core allows at most 128 for a thing"),
])
def test_thing_must_be_one_topic_level(folder, thing, message):
    with pytest.raises(ConfigErrors, match=exactly(message)):
        load(write(folder, MINIMAL.replace("gw-test-01", thing)))


def test_app_is_checked_like_thing(folder):
    with pytest.raises(ConfigErrors, match=exactly("app: 'a/b' contains '/', which cannot stand in a topic level")):
        load(write(folder, MINIMAL + "app: a/b\n"))


def test_speed_shows_the_value_as_written_not_as_a_float(folder):
    text = MINIMAL.replace("publisher:", "  - {type: replay, name: fast, path: readings.csv, speed: -3}\npublisher:")
    with pytest.raises(ConfigErrors, match=exactly("sources[1].speed: -3 must be > 0")) as info:
        load(write(folder, text))
    (error,) = info.value.errors
    assert (error.path, error.message) == ("sources[1].speed", "-3 must be > 0")


def test_several_errors_are_reported_at_once_one_per_line(folder):
    text = """\
thing: gw/01
buffer: {policy: drop_newest, polcy: x}
sources:
  - {type: replay, path: readings.csv}
  - {type: replay, name: second, path: nope.csv, speed: -3}
publisher: {type: memory}
forwarder: {batch_size: 101, backoff_min_s: 5, backoff_max_s: 2}
"""
    with pytest.raises(ConfigErrors) as info:
        load(write(folder, text))
    assert str(info.value) == (
        "thing: 'gw/01' contains '/', which cannot stand in a topic level\n"
        f"buffer.polcy: unknown key; did you mean 'policy'? (allowed: {BUFFER_KEYS})\n"
        "buffer.policy: 'drop_newest' is not one of drop_oldest, reject_newest\n"
        "sources[1].path: nope.csv does not exist\n"
        "sources[1].speed: -3 must be > 0\n"
        "forwarder.batch_size: 101 is out of range 1..100\n"
        "forwarder.backoff_max_s: 2 must be >= backoff_min_s (5)"
    )
    assert [e.path for e in info.value.errors] == [
        "thing", "buffer.polcy", "buffer.policy", "sources[1].path", "sources[1].speed",
        "forwarder.batch_size", "forwarder.backoff_max_s",
    ]
    assert isinstance(info.value, ConfigError)  # one except clause catches one error and many


# ---------------------------------------------------------------- the file itself


def test_invalid_yaml_names_file_line_and_column(folder):
    path = write(folder, "thing: gw-test-01\nsources: [\n  {type: replay\npublisher: {type: memory}\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}:4:10: not valid YAML: expected ',' or '}}', but got ':'")):
        load(path)


def test_bad_indentation_names_file_line_and_column(folder):
    path = write(folder, "thing: gw-test-01\n  app: meters\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}:2:6: not valid YAML: mapping values are not allowed here")):
        load(path)


def test_a_character_yaml_forbids_names_its_place(folder):
    path = write(folder, "thing: gw\x00\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}:1:10: not valid YAML: special characters are not "
                                                  "allowed (U+0000)")):
        load(path)


def test_a_key_given_twice_is_refused(folder):
    path = write(folder, MINIMAL + "buffer: {path: a.db}\nbuffer: {path: b.db}\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}:7:1: not valid YAML: duplicate key 'buffer' "
                                                  "(first on line 6)")):
        load(path)


def test_missing_config_file(folder):
    path = folder / "absent.yaml"
    with pytest.raises(ConfigError, match=exactly(f"{path}: cannot read the config: No such file or directory")):
        load(path)


def test_unreadable_config_path(folder):
    with pytest.raises(ConfigError, match=exactly(f"{folder}: cannot read the config: Is a directory")):
        load(folder)


def test_config_that_is_not_utf8(folder):
    path = folder / "latin1.yaml"
    path.write_bytes("thing: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=exactly(f"{path}: cannot read the config: not UTF-8 (byte 0xe9 "
                                                  "at offset 10)")):
        load(path)


def test_a_utf8_byte_order_mark_is_accepted(folder):
    path = folder / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load(path).thing == "gw-test-01"


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n"], ids=["empty", "comments-only"])
def test_empty_config_file(folder, text):
    path = write(folder, text)
    with pytest.raises(ConfigError, match=exactly(f"{path}: the config is empty (it needs at least thing, "
                                                  "sources and publisher)")):
        load(path)


def test_sites_was_accepted_and_read_by_nothing(folder):
    with pytest.raises(ConfigErrors, match=exactly(f"sites: unknown key (allowed: {TOP_KEYS})")):
        validate({"thing": "gw-1", "sources": [{"type": "replay", "path": "readings.csv"}],
                  "publisher": {"type": "memory"}, "sites": 42}, base=folder)


# ---------------------------------------------------------------- a simulator's start


@pytest.mark.parametrize("start", [
    "2016-01-01T00:00:00Z",  # an unquoted YAML timestamp: PyYAML gives an aware datetime
    "2016-01-01",  # a YAML date
    "2016-01-01 00:00:00",  # a naive YAML timestamp: UTC, as YAML says
    "'2016-01-01T00:00:00Z'",  # text
    "'2016-01-01T01:00:00+01:00'",
    "'2016-01-01T00:00'",  # text without an offset: UTC
])
def test_start_is_normalised_to_epoch_ms(folder, start):
    config = load(write(folder, sim(f"start: {start}")))
    assert config.sources[1]["start_ms"] == 1_451_606_400_000
    assert "start" not in config.sources[1]


def test_build_source_starts_the_simulator_at_start_ms(folder):
    from gateway.runner import build_source

    config = load(write(folder, sim("start: 2016-01-01T00:00:00Z, meters: 3, count: 2, speed: null")))
    source = build_source(config.sources[1])
    assert source.start_ms == 1_451_606_400_000 and source.end_ms == 1_451_606_400_000 + 2 * 60_000


# ---------------------------------------------------------------- the config file itself: size, kind, depth


def test_a_fifo_as_config_is_refused_without_opening_it(folder):
    path = folder / "gw.yaml"
    os.mkfifo(path)  # opening it for reading would block until a writer came
    with pytest.raises(ConfigError, match=exactly(f"{path}: cannot read the config: not a regular file (a FIFO)")):
        load(path)


def test_a_config_over_1_mib_is_refused_before_it_is_read(folder):
    path = write(folder, MINIMAL + "#" * (2**20 - len(MINIMAL)) + "\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}: cannot read the config: 1,048,577 bytes is more "
                                                  "than the 1,048,576 a config may have")):
        load(path)
    path.write_text(MINIMAL + "#" * (2**20 - len(MINIMAL) - 1) + "\n")  # exactly 1 MiB is fine
    assert load(path).thing == "gw-test-01"


@pytest.mark.parametrize(("text", "column"), [
    ("thing: " + "[" * 100_000, 39),  # PyYAML recursed until a RecursionError traceback
    ("thing: " + "{a: " * 100_000, 132),
])
def test_deep_nesting_is_a_clear_error(folder, text, column):
    path = write(folder, text)
    with pytest.raises(ConfigError, match=exactly(f"{path}:1:{column}: not valid YAML: nested more than 32 deep")):
        load(path)


def test_nesting_up_to_the_limit_is_read(folder):
    path = write(folder, MINIMAL + "buffer: {path: " + "[" * 30 + "]" * 30 + "}\n")
    with pytest.raises(ConfigErrors, match=exactly(
            f"buffer.path: {'[' * 30}{']' * 30} must be a string")):
        load(path)  # parsed; refused by the validator, not by the reader


def test_validate_refuses_a_deep_greengrass_update_without_a_traceback(folder):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    raw = {"thing": deep, "sources": [{"type": "replay", "path": "readings.csv"}], "publisher": {"type": "memory"}}
    with pytest.raises(ConfigErrors, match=exactly("thing: a value nested too deeply to show must be a string")):
        validate(raw, base=folder)


# ---------------------------------------------------------------- preflight: what a start reads


@pytest.fixture
def tls(folder, certs) -> dict[str, str]:
    """Publisher files in ``folder``: good ones, a key of another thing, garbage, an encrypted key."""
    client, other = certs.client("meter-gw-1"), certs.client("test-subscriber")  # conftest's two
    files = {"gw.crt": client.cert, "gw.key": client.key, "ca.crt": certs.ca, "other.key": other.key}
    for name, source in files.items():
        shutil.copy(source, folder / name)
    (folder / "garbage.pem").write_text("-----BEGIN GARBAGE-----\nbm90IGEga2V5\n-----END GARBAGE-----\n")
    subprocess.run(["openssl", "pkey", "-in", str(client.key), "-aes256", "-passout", "pass:secret",
                    "-out", str(folder / "encrypted.key")], check=True, capture_output=True)
    return {"cert": "gw.crt", "key": "gw.key", "ca": "ca.crt"}


def with_tls(files: dict[str, str], **changes: str) -> str:
    given = ", ".join(f"{k}: {v}" for k, v in {**files, **changes}.items())
    return MINIMAL.replace("{type: memory}", f"{{type: mqtt, endpoint: localhost, {given}}}")


def preflight_errors(folder: Path, text: str) -> list[str]:
    config = load(write(folder, text))  # validate() passes: the files exist and are files
    before = set(folder.rglob("*"))
    with pytest.raises(ConfigErrors) as info:
        preflight.check(config)
    assert set(folder.rglob("*")) == before  # nothing created: no buffer, no var/
    return [str(e) for e in info.value.errors]


def test_preflight_passes_a_config_that_starts_and_creates_nothing(folder, tls):
    shutil.copytree(MODEL, folder / "model")
    config = load(write(folder, with_tls(tls) + f"model: {{path: model}}\nweather: {{path: {WEATHER}}}\n"))
    before = set(folder.rglob("*"))
    assert preflight.check(config) is None
    assert set(folder.rglob("*")) == before


PREFLIGHT_CASES = [
    ("garbage-key", {"key": "garbage.pem"}, ["publisher.key: garbage.pem is not a PEM private key"]),
    ("key-of-another-certificate", {"key": "other.key"},
     ["publisher.key: other.key does not match the certificate in publisher.cert (gw.crt)"]),
    ("encrypted-key", {"key": "encrypted.key"},
     ["publisher.key: encrypted.key is encrypted; the gateway needs an unencrypted private key"]),
    ("garbage-ca", {"ca": "garbage.pem"},  # was reported as a problem of the certificate and key
     ["publisher.ca: garbage.pem holds no PEM certificate to trust"]),
    ("garbage-cert", {"cert": "garbage.pem"}, ["publisher.cert: garbage.pem holds no PEM certificate"]),
    ("everything-swapped", {"cert": "gw.key", "key": "gw.crt", "ca": "gw.key"},
     ["publisher.cert: gw.key holds no PEM certificate", "publisher.key: gw.crt is not a PEM private key",
      "publisher.ca: gw.key holds no PEM certificate to trust"]),
]


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in PREFLIGHT_CASES], ids=[c[0] for c in PREFLIGHT_CASES])
def test_preflight_loads_the_certificates_for_real(folder, tls, changes, expected):
    assert preflight_errors(folder, with_tls(tls, **changes)) == expected


def test_preflight_runs_the_model_checks_and_loads_buildings_and_weather(folder):
    shutil.copytree(MODEL, folder / "model")
    (folder / "model" / "golden.json").write_text("not json")
    (folder / "buildings.csv").write_text("building_id,site_id\n1,2\n")
    (folder / "weather.json").write_text('{"site_id": 1}')
    (folder / "broken.json.gz").write_bytes(b"not gzip")
    text = MINIMAL + "model: {path: model, buildings: buildings.csv}\nweather: {path: weather.json}\n"
    model = folder.resolve() / "model"
    assert preflight_errors(folder, text) == [
        f"model.path: {model}/golden.json: cannot read golden vectors: Expecting value: line 1 column 1 (char 0)",
        f"model.buildings: {folder.resolve()}/buildings.csv: missing columns floor_count, primary_use, "
        "square_feet, year_built",
        "weather.path: weather.json cannot be loaded: not a JSON array of weather messages",
    ]
    assert preflight_errors(folder, MINIMAL + "weather: {path: broken.json.gz}\n") == [
        "weather.path: broken.json.gz cannot be loaded: Not a gzipped file (b'no')"]


def test_preflight_skips_a_model_that_is_not_enabled(folder):
    (folder / "model").mkdir()  # no model.onnx: a start with enabled: false never loads it
    assert preflight.check(load(write(folder, MINIMAL + "model: {path: model, enabled: false}\n"))) is None


def test_preflight_reads_a_replay_header_as_the_reader_does(folder):
    (folder / "old.csv").write_text("building_id,meter,timestamp,meter_reading\n1,0,2016-01-01 00:00:00,1.5\n")
    text = MINIMAL.replace("publisher:", "  - {type: replay, name: old, path: old.csv}\npublisher:")
    assert preflight_errors(folder, text) == ["sources[1].path: old.csv: no column site_id in the header"]


def test_preflight_refuses_a_buffer_file_that_is_not_a_gateway_buffer(folder):
    (folder / "notes.db").write_text("not a database")
    assert preflight_errors(folder, MINIMAL + "buffer: {path: notes.db}\n") == [
        "buffer.path: notes.db is not a SQLite buffer (file is not a database)"]
    db = sqlite3.connect(folder / "other.db")
    db.execute("CREATE TABLE t(x)")
    db.close()
    assert preflight_errors(folder, MINIMAL + "buffer: {path: other.db}\n") == [
        "buffer.path: other.db is a SQLite file but not a gateway buffer (it has tables t)"]


def test_preflight_refuses_a_buffer_of_a_newer_gateway(folder):
    from gateway.buffer import MIGRATIONS

    db = sqlite3.connect(folder / "newer.db")
    db.execute("CREATE TABLE migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
    db.execute("INSERT INTO migrations VALUES(999, 'from the future', 0)")
    db.commit()
    db.close()
    known = max(v for v, _, _ in MIGRATIONS)
    assert preflight_errors(folder, MINIMAL + "buffer: {path: newer.db}\n") == [
        f"buffer.path: newer.db has schema version 999, newer than this gateway knows ({known}); upgrade the "
        "gateway or point it at another buffer file"]


# ---------------------------------------------------------------- a folder the gateway cannot write


def test_a_buffer_folder_that_is_not_writable(folder, monkeypatch):
    """Tests run as root, for whom access() always says yes; so the answer is faked, for the folder only."""
    real_access = os.access
    locked = folder.resolve() / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert errors(folder, MINIMAL + "buffer: {path: locked/new/buffer.db}\n") == [
        f"buffer.path: locked/new/buffer.db cannot be created: {locked} is not writable"]


def test_a_buffer_on_a_read_only_file_system(folder, monkeypatch):
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, result):
            self.f_flag = result.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    assert errors(folder, MINIMAL) == [
        f"buffer.path: var/buffer.db cannot be created: {folder.resolve()} is on a read-only file system"]


# ---------------------------------------------------------------- no constructor raises on a validated config


def test_the_extremes_a_config_allows_build(folder):
    from gateway.buffer import Buffer
    from gateway.runner import build_source

    config = load(write(folder, """\
thing: gw-test-01
buffer: {path: var/buffer.db, budget_mb: 1, live_window_s: 31536000}
sources:
  - {type: simulator, name: a, seed: 4294967295, interval_s: 86400, start: 9999-12-30, count: 1000000000000,
     speed: 1.0e+300, meters: 5}
  - {type: simulator, name: b, seed: 0, interval_s: 1, start: 2000-01-01, anomaly_rate: 1, speed: null, meters: 5}
  - {type: replay, path: readings.csv, speed: 1.0e-300, batch_size: 100000}
publisher: {type: memory}
"""))
    assert [type(build_source(s)).__name__ for s in config.sources] == ["SimulatorSource"] * 2 + ["ReplaySource"]
    b = config.buffer
    buffer = Buffer(b["path"], budget_bytes=b["budget_bytes"], policy=b["policy"],
                    live_window_ms=b["live_window_ms"], synchronous=b["synchronous"])
    try:
        assert buffer.status()["budget_bytes"] == 2**20
    finally:
        buffer.close()


def test_the_forwarder_and_model_keys_of_the_fault_paths(tmp_path):
    from gateway.config import validate

    base = {"thing": "gw-1", "sources": [{"type": "simulator"}], "publisher": {"type": "memory"}}
    good = validate({**base, "forwarder": {"auth_retry_s": 60, "basic_ingest_rule": "meters_raw"}}, tmp_path)
    assert good.forwarder["auth_retry_s"] == 60 and good.forwarder["basic_ingest_rule"] == "meters_raw"
    assert validate(base, tmp_path).forwarder["basic_ingest_rule"] is None
    with pytest.raises(ConfigErrors, match=r"^forwarder\.auth_retry_s: 0 must be > 0\nforwarder\.basic_ingest_rule: "
                                           r"'meters-raw' must be 1 to 128 letters, digits or underscores$"):
        validate({**base, "forwarder": {"basic_ingest_rule": "meters-raw", "auth_retry_s": 0}}, tmp_path)


# ---------------------------------------------------------------- the publisher types of Greengrass


def test_an_ipc_publisher_fills_its_defaults(folder):
    config = load(write(folder, MINIMAL.replace("{type: memory}", "{type: ipc}")))
    assert config.publisher == {"type": "ipc", "delivery": "handoff", "receipt_timeout_s": 60}
    config = load(write(folder, MINIMAL.replace("{type: memory}", "{type: ipc, delivery: receipt, "
                                                                 "receipt_timeout_s: 2.5}")))
    assert config.publisher == {"type": "ipc", "delivery": "receipt", "receipt_timeout_s": 2.5}


def test_an_mqtt_client_id_is_kept(folder):
    assert load(write(folder, mqtt("client_id: gw-test-01-direct"))).publisher["client_id"] == "gw-test-01-direct"


@pytest.mark.parametrize(("keys", "shown"), [("", " (the default)"), ("client_id: null", " (the default)"),
                                             ("client_id: gw-test-01", "")])
def test_inside_greengrass_an_mqtt_client_id_must_not_be_the_thing_name(folder, keys, shown):
    text = mqtt(keys) if keys else mqtt("port: 8883")
    load(write(folder, text))  # outside Greengrass, the thing name is the usual client id
    with pytest.raises(ConfigErrors, match=exactly(
            f"publisher.client_id: 'gw-test-01'{shown} is the thing name: inside Greengrass the nucleus connects as "
            "gw-test-01; the two would keep disconnecting each other (use type: ipc, or another client_id)")):
        load(write(folder, text), greengrass=True)
    assert load(write(folder, mqtt("client_id: gw-test-01-direct")), greengrass=True).publisher["client_id"] \
        == "gw-test-01-direct"
    with pytest.raises(ConfigErrors, match=exactly(
            "publisher.client_id: 'gw-test-01#2' is a client id the nucleus uses for its extra connections "
            "(gw-test-01#<n>); the two would keep disconnecting each other (use type: ipc, or another client_id)")):
        load(write(folder, mqtt("client_id: 'gw-test-01#2'")), greengrass=True)
    assert load(write(folder, MINIMAL.replace("{type: memory}", "{type: ipc}")), greengrass=True).publisher["type"] \
        == "ipc"


@pytest.mark.parametrize(("env", "inside"), [
    ({}, False), ({"SVCUID": ""}, False), ({"SVCUID": "token"}, True),
    ({"AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/greengrass/v2/ipc.socket"}, True),
])
def test_in_greengrass_reads_what_the_nucleus_sets(env, inside):
    from gateway.config import in_greengrass

    assert in_greengrass(env) is inside


def test_build_publisher_makes_an_ipc_publisher_over_a_real_client_only_inside_greengrass(folder, monkeypatch):
    from unittest.mock import create_autospec

    from awsiot.greengrasscoreipc import model
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from gateway.publishers import ipc
    from gateway.runner import build_publisher

    config = load(write(folder, MINIMAL.replace("{type: memory}", "{type: ipc, delivery: receipt}")))
    for name in ("SVCUID", "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"^publisher\.type: ipc needs the Greengrass nucleus"):
        build_publisher(config)  # the real GreengrassCoreIPCClientV2, with no nucleus to connect to
    client = create_autospec(GreengrassCoreIPCClientV2, instance=True)
    client.subscribe_to_iot_core_connection_status.return_value = (
        model.SubscribeToIoTCoreConnectionStatusResponse(), object())
    client.subscribe_to_iot_core.return_value = (model.SubscribeToIoTCoreResponse(), object())
    monkeypatch.setattr(ipc, "_default_connect", lambda: client)
    pub = build_publisher(config)
    try:
        assert isinstance(pub, ipc.IpcPublisher) and (pub.delivery, pub.receipt_timeout_s) == ("receipt", 60)
        assert client.subscribe_to_iot_core.call_args.kwargs["topic_name"] == "cmd/meters/gw-test-01/receipt"
    finally:
        pub.close()
    client.close.assert_called_once()  # it created the client, so it closes it
