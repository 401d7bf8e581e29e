"""Register maps: the shipped maps load, every type and order round-trips, plan() coalesces, errors name the path."""

import math

import pytest

from gateway.errors import ConfigError, ConfigErrors
from gateway.registermap import DATA_TYPES, Register, decode, encode, load_map, plan, shipped, words

VALUES = {"u16": 54321, "i16": -1234, "u32": 3_000_000_000, "i32": -2_000_000_000, "u64": 2**63 + 12345,
          "f32": 1234.5, "f64": -98765.4321}


def test_shipped_maps_load_with_an_energy_register_and_a_document():
    assert {"eastron-sdm630", "schneider-iem3000", "carlo-gavazzi-em24"} <= set(shipped())
    for name in shipped():
        m = load_map(name)
        assert m.document and m.of_meaning("energy")
        assert all(start + count <= start + m.max_count for _, start, count in m.plan())


def test_the_maps_read_what_the_makers_document():
    sdm = load_map("eastron-sdm630")
    assert (sdm.register("total_import_kwh").address, sdm.register("total_system_power").address) == (0x48, 0x34)
    iem = load_map("schneider-iem3000").register("total_active_energy_import")
    assert (iem.kind, iem.address, iem.data_type, iem.unit) == ("holding", 3203, "u64", "Wh")
    em24 = load_map("carlo-gavazzi-em24").register("kwh_import_total")
    assert (em24.word_order, em24.scale, em24.data_type) == ("little", 0.1, "i32")


@pytest.mark.parametrize("data_type", list(DATA_TYPES))
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
def test_encode_decode_round_trip(data_type, word_order, byte_order):
    r = Register("x", "holding", 0, data_type, word_order, byte_order, meaning="power", unit="kW")
    got = decode(r, encode(r, VALUES[data_type]))
    assert len(encode(r, VALUES[data_type])) == words(r)
    assert math.isclose(got, VALUES[data_type], rel_tol=1e-7)


def test_word_and_byte_order_put_the_words_where_the_meter_does():
    big = Register("x", "input", 0, "u32")
    assert encode(big, 0x01020304) == [0x0102, 0x0304]
    assert encode(Register("x", "input", 0, "u32", word_order="little"), 0x01020304) == [0x0304, 0x0102]
    assert encode(Register("x", "input", 0, "u32", byte_order="little"), 0x01020304) == [0x0201, 0x0403]


def test_a_scaled_counter_encodes_raw_and_wraps_at_its_rollover():
    r = Register("e", "input", 0, "u32", scale=0.1, rollover=1000.0)
    assert encode(r, 12.3) == [0, 123]
    assert decode(r, encode(r, 1000.5)) == pytest.approx(0.5)
    assert r.modulus == 1000.0
    assert Register("e", "input", 0, "u16").modulus == 65536.0
    assert Register("e", "input", 0, "f32").modulus is None


def test_plan_coalesces_contiguous_registers_up_to_max_count():
    regs = [Register(f"r{i}", "input", i * 2, "f32") for i in range(100)]  # 200 contiguous words
    assert plan(regs) == [("input", 0, 124), ("input", 124, 76)]
    assert plan(regs, max_count=11) == [("input", s, min(10, 200 - s)) for s in range(0, 200, 10)]
    apart = [Register("a", "input", 0, "u16"), Register("b", "input", 3, "u16"), Register("c", "holding", 3, "u16")]
    assert plan(apart) == [("holding", 3, 1), ("input", 0, 1), ("input", 3, 1)]
    assert plan(apart, max_gap=2) == [("holding", 3, 1), ("input", 0, 4)]


def write(tmp_path, text, name="meter.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """maker: X
model: Y
document: Z
registers:
  - {name: e, type: input, address: 0, data_type: u32, unit: kWh, meaning: energy}
"""


@pytest.mark.parametrize("change, message", [
    (("u32", "f16"), "meter.yaml: registers[0].data_type: 'f16' is not one of u16, i16, u32, i32, u64, f32, f64"),
    (("type: input", "type: coil"), "meter.yaml: registers[0].type: 'coil' is not one of holding, input"),
    (("address: 0", "address: 65535"), "meter.yaml: registers[0].address: 65535 is out of range 0..65534 for a u32"),
    (("unit: kWh", "unit: kW"), "meter.yaml: registers[0].unit: 'kW' is a unit of power, not of energy"),
    (("meaning: energy", "meaning: volts"), "meter.yaml: registers[0].meaning: 'volts' is not one of energy, power"),
    (("unit: kWh,", "unit: kWh, scale: 0,"), "meter.yaml: registers[0].scale: 0 must be a number > 0"),
    (("unit: kWh,", "unit: kWh, word_order: middle,"),
     "meter.yaml: registers[0].word_order: 'middle' is not one of big, little"),
    (("document: Z\n", ""), "meter.yaml: document: is required"),
    (("meaning: energy", "meaning: power, unit: W"), None),
])
def test_bad_maps_name_the_file_and_key_path(tmp_path, change, message):
    text = GOOD.replace(*change)
    with pytest.raises(ConfigErrors) as err:
        load_map(write(tmp_path, text))
    if message is None:  # a map with no energy counter
        assert "has no register of meaning energy" in str(err.value)
    else:
        assert message in str(err.value).splitlines()


def test_unknown_shipped_map_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"^nope: is not a shipped register map \(shipped: .*eastron-sdm630"):
        load_map("nope")
