"""Register maps: where a meter keeps its values, in what type and order, declared in YAML.

A Modbus meter is a table of 16-bit registers. A map says which of them hold what::

    maker: Eastron
    model: SDM630 Modbus V2
    document: "Eastron SDM630 Modbus Protocol, V1.5, Input Registers table"
    defaults: {word_order: big, byte_order: big}   # [big, big]
    max_gap: 0                # [0] unused registers a coalesced request may read across (see plan)
    max_count: 125            # [125] the most registers the meter answers in one request (1..125)
    registers:
      - name: total_import_kwh
        type: input           # holding (function 3) or input (function 4)
        address: 0x0156       # 0-based protocol address (what goes on the wire); not the 3xxxx/4xxxx number
        data_type: f32        # u16, i16, u32, i32, u64, f32, f64
        word_order: big       # [defaults] big = high word first (the Modbus convention); little = LSW first
        byte_order: big       # [defaults] big = high byte first within each register
        scale: 1.0            # [1.0] value = raw × scale (0.1 for a kWh×10 register)
        unit: kWh             # kWh, Wh, MWh (energy) or kW, W (power)
        meaning: energy       # energy = a cumulative counter, power = instantaneous power
        rollover: null        # [the type's range × scale] where the counter wraps to 0, in `unit`

``rollover`` is the counter's modulus: its values are in ``[0, rollover)``, and after
``rollover − scale`` comes 0. Left out, it is ``2**bits × scale`` for an integer type and None
(no wrap: going backwards is a reset) for a float. A signed counter is read modulo the same value.

Shipped maps live in ``gateway/registermaps/<name>.yaml``; :func:`load_map` takes that name or a
path. A map is validated like the config: every problem, with its key path and the file's name,
in one :class:`~gateway.errors.ConfigErrors` (``eastron-sdm630.yaml: registers[2].data_type: 'f16'
is not one of u16, i16, u32, i32, u64, f32, f64``).

:func:`decode` turns a register's words into its scaled value; :func:`encode` is the inverse (the
simulated fleet serves values with it). :func:`plan` turns a set of registers into as few read
requests as the protocol allows.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from gateway.errors import ConfigError, ConfigErrors

__all__ = ["Register", "RegisterMap", "load_map", "shipped", "words", "decode", "encode", "plan",
           "DATA_TYPES", "KINDS", "MEANINGS", "UNITS", "MAX_COUNT", "MAPS_DIR"]

#: data type → (struct code, registers spanned, integer?)
DATA_TYPES: dict[str, tuple[str, int, bool]] = {
    "u16": ("H", 1, True), "i16": ("h", 1, True), "u32": ("I", 2, True), "i32": ("i", 2, True),
    "u64": ("Q", 4, True), "f32": ("f", 2, False), "f64": ("d", 4, False),
}
KINDS = ("holding", "input")
ORDERS = ("big", "little")
MEANINGS = ("energy", "power")
#: unit → (meaning, factor to kWh or kW)
UNITS: dict[str, tuple[str, float]] = {
    "Wh": ("energy", 0.001), "kWh": ("energy", 1.0), "MWh": ("energy", 1000.0),
    "W": ("power", 0.001), "kW": ("power", 1.0), "MW": ("power", 1000.0),
}
#: The most registers one read request may ask for (Modbus application protocol, function 3/4).
MAX_COUNT = 125
#: The highest protocol address (addresses are 16 bits on the wire).
MAX_ADDRESS = 0xFFFF
#: Where the shipped maps are.
MAPS_DIR = Path(__file__).resolve().parent / "registermaps"


@dataclass(frozen=True)
class Register:
    name: str
    kind: str  # "holding" | "input"
    address: int  # 0-based protocol address
    data_type: str
    word_order: str = "big"
    byte_order: str = "big"
    scale: float = 1.0
    unit: str = "kWh"
    meaning: str = "energy"
    rollover: float | None = None  # the counter's modulus in `unit`; see the module doc

    @property
    def to_kwh(self) -> float:
        """The factor from this register's unit to kWh (energy) or kW (power)."""
        return UNITS[self.unit][1]

    @property
    def modulus(self) -> float | None:
        """Where the counter wraps, in ``unit``: the declared rollover, else the type's range."""
        if self.rollover is not None:
            return self.rollover
        code, n, integer = DATA_TYPES[self.data_type]
        return float(2 ** (16 * n)) * self.scale if integer else None


@dataclass(frozen=True)
class RegisterMap:
    name: str
    maker: str
    model: str
    document: str
    registers: list[Register] = field(default_factory=list)
    max_gap: int = 0
    max_count: int = MAX_COUNT

    def plan(self, registers: Iterable[Register] | None = None) -> list[tuple[str, int, int]]:
        """The read requests for ``registers`` (default all of the map's), within its limits."""
        return plan(self.registers if registers is None else registers, self.max_count, self.max_gap)

    def register(self, name: str) -> Register:
        for r in self.registers:
            if r.name == name:
                return r
        raise KeyError(name)

    def of_meaning(self, meaning: str) -> list[Register]:
        return [r for r in self.registers if r.meaning == meaning]


# -- words ----------------------------------------------------------------------------------


def words(register: Register) -> int:
    """How many 16-bit registers ``register`` spans."""
    return DATA_TYPES[register.data_type][1]


def _bytes_of(register: Register, regs: list[int]) -> bytes:
    """The value's bytes, most significant first, from the words as the meter sends them."""
    if len(regs) != words(register):
        raise ValueError(f"{register.name}: {len(regs)} words for a {register.data_type} (needs {words(register)})")
    ordered = list(regs) if register.word_order == "big" else list(reversed(regs))
    swap = register.byte_order == "little"
    return b"".join(((w & 0xFF) << 8 | (w >> 8)).to_bytes(2, "big") if swap else (w & 0xFFFF).to_bytes(2, "big")
                    for w in ordered)


def decode(register: Register, regs: list[int]) -> float:
    """The scaled value (in ``register.unit``) of the words ``regs`` read from the meter."""
    code = DATA_TYPES[register.data_type][0]
    raw = struct.unpack(">" + code, _bytes_of(register, regs))[0]
    return raw * register.scale


def encode(register: Register, value: float) -> list[int]:
    """The words a meter would send for ``value`` (in ``register.unit``): the inverse of decode.

    An integer type rounds ``value / scale``; a counter past its rollover wraps (values are taken
    modulo :attr:`Register.modulus`, and a signed type in two's complement). A value an integer
    type cannot hold otherwise raises ValueError."""
    code, n, integer = DATA_TYPES[register.data_type]
    if integer:
        raw = round(value / register.scale)
        if register.meaning == "energy" and register.rollover is not None:
            raw %= round(register.rollover / register.scale)
        bits = 16 * n
        if code.islower():  # signed: two's complement
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if register.meaning == "energy":
                raw = (raw + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
        else:
            lo, hi = 0, (1 << bits) - 1
            if register.meaning == "energy":
                raw %= 1 << bits
        if not lo <= raw <= hi:
            raise ValueError(f"{register.name}: {value!r} does not fit a {register.data_type} at scale {register.scale}")
        data = struct.pack(">" + code, raw)
    else:
        data = struct.pack(">" + code, value / register.scale if register.scale != 1 else value)
    out = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if register.byte_order == "little":
        out = [((w & 0xFF) << 8) | (w >> 8) for w in out]
    return out if register.word_order == "big" else list(reversed(out))


# -- requests -------------------------------------------------------------------------------


def plan(registers: Iterable[Register], max_count: int = MAX_COUNT, max_gap: int = 0) -> list[tuple[str, int, int]]:
    """The read requests ``(kind, start, count)`` that fetch ``registers``, as few as allowed.

    Registers of one kind are sorted by address and merged into one request while the request
    stays within ``max_count`` registers (125, the protocol's limit for functions 3 and 4) and
    the unused registers between two neighbours are at most ``max_gap``. The default 0 reads only
    contiguous runs: many meters answer a read that touches an unmapped address with exception 2
    (illegal data address), so reading across a gap is a map's explicit choice (``max_gap``).
    Overlapping registers share their words."""
    out: list[tuple[str, int, int]] = []
    for kind in KINDS:
        regs = sorted((r for r in registers if r.kind == kind), key=lambda r: r.address)
        start = end = None  # the current request's [start, end)
        for r in regs:
            r_end = r.address + words(r)
            if start is not None and r.address - end <= max_gap and max(end, r_end) - start <= max_count:
                end = max(end, r_end)
                continue
            if start is not None:
                out.append((kind, start, end - start))
            start, end = r.address, r_end
        if start is not None:
            out.append((kind, start, end - start))
    return out


def extract(register: Register, requests: dict[tuple[str, int, int], list[int]]) -> list[int]:
    """The words of ``register`` out of the answers to :func:`plan`'s requests."""
    for (kind, start, count), regs in requests.items():
        if kind == register.kind and start <= register.address and register.address + words(register) <= start + count:
            i = register.address - start
            return regs[i : i + words(register)]
    raise KeyError(register.name)


# -- loading --------------------------------------------------------------------------------


def shipped() -> list[str]:
    """The names of the maps shipped with the gateway."""
    return sorted(p.stem for p in MAPS_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return MAPS_DIR / f"{text}.yaml"


def load_map(name_or_path: str | Path) -> RegisterMap:
    """A shipped map by name (``eastron-sdm630``) or a map file by path, validated.

    Raises :class:`~gateway.errors.ConfigErrors` naming the file and each key path."""
    path = _resolve(name_or_path)
    label = path.name
    if not path.is_file():
        if path.parent == MAPS_DIR:
            raise ConfigError(str(name_or_path), f"is not a shipped register map (shipped: {', '.join(shipped())}) "
                                                 "nor a map file")
        raise ConfigError(str(path), "register map: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the register map: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
        raise ConfigError(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    return validate_map(raw, path.stem, label)


def validate_map(raw: Any, name: str, label: str) -> RegisterMap:
    """Check a parsed map (``label`` prefixes every error's key path) and build it."""
    errors: list[ConfigError] = []

    def fail(where: str, message: str) -> None:
        errors.append(ConfigError(f"{label}: {where}" if where else label, message))

    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError(label, f"{_show(raw)} must be a mapping (maker, model, document, registers)")])
    top_keys = {"maker", "model", "document", "defaults", "registers", "max_gap", "max_count"}
    for key in raw:
        if key not in top_keys:
            fail(str(key), f"unknown key (allowed: {', '.join(sorted(top_keys))})")
    texts = {}
    for key in ("maker", "model", "document"):
        v = raw.get(key)
        if not isinstance(v, str) or not v.strip():
            fail(key, "is required" if v is None else f"{_show(v)} must be a non-empty string")
        texts[key] = v if isinstance(v, str) else ""
    defaults = raw.get("defaults") or {}
    dflt = {"word_order": "big", "byte_order": "big"}
    if not isinstance(defaults, dict):
        fail("defaults", f"{_show(defaults)} must be a mapping")
        defaults = {}
    for key, v in defaults.items():
        if key not in dflt:
            fail(f"defaults.{key}", "unknown key (allowed: byte_order, word_order)")
        elif v not in ORDERS:
            fail(f"defaults.{key}", f"{_show(v)} is not one of {', '.join(ORDERS)}")
        else:
            dflt[key] = v
    max_gap = raw.get("max_gap", 0)
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or not 0 <= max_gap <= MAX_COUNT:
        fail("max_gap", f"{_show(max_gap)} must be an integer within 0..{MAX_COUNT}")
        max_gap = 0
    max_count = raw.get("max_count", MAX_COUNT)
    if isinstance(max_count, bool) or not isinstance(max_count, int) or not 1 <= max_count <= MAX_COUNT:
        fail("max_count", f"{_show(max_count)} must be an integer within 1..{MAX_COUNT}")
        max_count = MAX_COUNT
    regs_raw = raw.get("registers")
    registers: list[Register] = []
    if not isinstance(regs_raw, list) or not regs_raw:
        fail("registers", "is required" if regs_raw is None else f"{_show(regs_raw)} must be a non-empty list")
        regs_raw = []
    allowed = {"name", "type", "address", "data_type", "word_order", "byte_order", "scale", "unit", "meaning",
               "rollover", "verified"}
    seen: dict[str, int] = {}
    for i, r in enumerate(regs_raw):
        where = f"registers[{i}]"
        if not isinstance(r, dict):
            fail(where, f"{_show(r)} must be a mapping")
            continue
        ok = True

        def bad(key: str, message: str) -> None:
            nonlocal ok
            ok = False
            fail(f"{where}.{key}", message)

        for key in r:
            if key not in allowed:
                bad(str(key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key in ("name", "type", "address", "data_type", "unit", "meaning"):
            if key not in r:
                bad(key, "is required")
        rname = r.get("name")
        if "name" in r and (not isinstance(rname, str) or not rname):
            bad("name", f"{_show(rname)} must be a non-empty string")
        elif isinstance(rname, str) and rname in seen:
            bad("name", f"{_show(rname)} is already the name of registers[{seen[rname]}]")
        elif isinstance(rname, str):
            seen[rname] = i
        kind = r.get("type")
        if "type" in r and kind not in KINDS:
            bad("type", f"{_show(kind)} is not one of {', '.join(KINDS)}")
        dt = r.get("data_type")
        if "data_type" in r and dt not in DATA_TYPES:
            bad("data_type", f"{_show(dt)} is not one of {', '.join(DATA_TYPES)}")
        addr = r.get("address")
        if "address" in r:
            if isinstance(addr, bool) or not isinstance(addr, int):
                bad("address", f"{_show(addr)} must be an integer (the 0-based protocol address)")
            elif dt in DATA_TYPES and not 0 <= addr <= MAX_ADDRESS + 1 - DATA_TYPES[dt][1]:
                bad("address", f"{addr} is out of range 0..{MAX_ADDRESS + 1 - DATA_TYPES[dt][1]} for a {dt}")
        for key in ("word_order", "byte_order"):
            if key in r and r[key] not in ORDERS:
                bad(key, f"{_show(r[key])} is not one of {', '.join(ORDERS)}")
        scale = r.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            bad("scale", f"{_show(scale)} must be a number > 0")
        meaning = r.get("meaning")
        if "meaning" in r and meaning not in MEANINGS:
            bad("meaning", f"{_show(meaning)} is not one of {', '.join(MEANINGS)}")
        unit = r.get("unit")
        if "unit" in r and unit not in UNITS:
            bad("unit", f"{_show(unit)} is not one of {', '.join(UNITS)}")
        elif unit in UNITS and meaning in MEANINGS and UNITS[unit][0] != meaning:
            bad("unit", f"{_show(unit)} is a unit of {UNITS[unit][0]}, not of {meaning}")
        rollover = r.get("rollover")
        if rollover is not None:
            if isinstance(rollover, bool) or not isinstance(rollover, (int, float)) or not rollover > 0:
                bad("rollover", f"{_show(rollover)} must be a number > 0 (or null for the type's range)")
            elif meaning == "power":
                bad("rollover", "only an energy counter rolls over")
        if ok:
            registers.append(Register(
                name=rname, kind=kind, address=addr, data_type=dt,
                word_order=r.get("word_order", dflt["word_order"]), byte_order=r.get("byte_order", dflt["byte_order"]),
                scale=float(scale), unit=unit, meaning=meaning,
                rollover=float(rollover) if rollover is not None else None,
            ))
    if errors:
        raise ConfigErrors(errors)
    if not any(r.meaning == "energy" for r in registers):
        raise ConfigErrors([ConfigError(f"{label}: registers", "has no register of meaning energy (a reading is "
                                                               "the delta of an energy counter)")])
    return RegisterMap(name=name, maker=texts["maker"], model=texts["model"], document=texts["document"],
                       registers=registers, max_gap=max_gap, max_count=max_count)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None or isinstance(value, (bool, list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9)
        return text.strip().removesuffix("...").strip()
    return str(value)
