"""SPARQ windows against a brute-force bit-level reference on all 256 byte values and all pairs."""

import pytest
import torch

from embq.dense.core.fakequant import ActQuantizer
from embq.dense.core.quantizers import QuantSpec
from embq.dense.core.windows import SparqSpec, SparqStats, apply_windows, sparq_codes, window_table
from embq.errors import ConfigError

# (window bits, options) -> [(select if any of these bits is set, window mask)], last = fallback.
# Written from the mask tables of the SPARQ kernel's description, not from embq's placement rule.
MASKS = {
    (4, 5): [(0x80, 0xF0), (0x40, 0x78), (0x20, 0x3C), (0x10, 0x1E), (None, 0x0F)],
    (4, 3): [(0xC0, 0xF0), (0x30, 0x3C), (None, 0x0F)],
    (4, 2): [(0xF0, 0xF0), (None, 0x0F)],
    (3, 6): [(0x80, 0xE0), (0x40, 0x70), (0x20, 0x38), (0x10, 0x1C), (0x08, 0x0E), (None, 0x07)],
    (2, 7): [
        (0x80, 0xC0),
        (0x40, 0x60),
        (0x20, 0x30),
        (0x10, 0x18),
        (0x08, 0x0C),
        (0x04, 0x06),
        (None, 0x03),
    ],
    (6, 3): [(0x80, 0xFC), (0x40, 0x7E), (None, 0x3F)],
}
WIDE = {4: None, 3: (6, 3), 2: (4, 5)}  # a survivor's 2n-bit window (None: all 8 bits)


def ref_window(a: int, key: tuple[int, int], rnd: bool) -> int:
    for select, mask in MASKS[key]:  # noqa: B007  (mask is used after the loop)
        if select is None or a & select:
            break
    h = a & mask
    if rnd:
        lsb = mask & -mask  # lowest bit of the window
        rbit = lsb >> 1  # the bit just below it
        # round up: the bit below is set and (the window's LSB is set or any lower bit is set)
        if rbit and (a & rbit) and ((a & lsb) or (a & (rbit - 1))):
            h += lsb
            if h == mask + lsb:  # carried out of the window: saturate
                h = mask
    return h


def ref_pair(a1: int, a2: int, bits: int, options: int, rnd: bool) -> tuple[int, int]:
    def wide(v):
        return v if WIDE[bits] is None else ref_window(v, WIDE[bits], rnd)

    if a1 == 0:
        return 0, wide(a2)
    if a2 == 0:
        return wide(a1), 0
    return ref_window(a1, (bits, options), rnd), ref_window(a2, (bits, options), rnd)


@pytest.mark.parametrize("key", sorted(MASKS))
@pytest.mark.parametrize("rounding", ["raw", "round"])
def test_window_table_all_bytes(key, rounding):
    table = window_table(key[0], key[1], rounding).tolist()
    expected = [ref_window(a, key, rounding == "round") for a in range(256)]
    assert table == expected
    # sanity of the reference itself: values that fit in the lowest window are exact,
    # windows keep at most `bits` significant bits, raw never rounds up
    for a in range(2 ** key[0]):
        assert table[a] == a
    for a, h in enumerate(table):
        bits_set = [i for i in range(8) if h >> i & 1]
        assert not bits_set or bits_set[-1] - bits_set[0] < key[0]
        if rounding == "raw":
            assert h <= a and (h & a) == h


def test_hand_examples():
    t5r, t5t = window_table(4, 5, "round").tolist(), window_table(4, 5, "raw").tolist()
    assert t5t[0b10110111] == 0b10110000  # bit 7 set: window F0, truncate
    assert t5r[0b10110111] == 0b10110000  # below-window bits 0111 < half: down
    assert t5r[0b10111000] == 0b11000000  # exactly half, window LSB odd: up
    assert t5r[0b10101000] == 0b10100000  # exactly half, window LSB even: stays
    assert t5r[0b11111000] == 0b11110000  # would carry out of F0: saturates
    assert t5r[0b01111100] == 0b01111000  # window 78 saturates too
    assert t5r[0b00101011] == 0b00101100  # window 3C, remainder 11 > half: up
    t2 = window_table(4, 2, "round").tolist()
    assert t2[0b00011111] == 0b00100000  # 2opt: upper nibble set -> F0; 1111 below rounds up


def test_vsparq_all_pairs():
    for bits, options, rounding in [
        (4, 5, "round"),
        (4, 3, "raw"),
        (4, 2, "round"),
        (3, 6, "round"),
        (2, 7, "raw"),
    ]:
        spec = SparqSpec(bits=bits, options=options, rounding=rounding, vsparq=True)
        a = torch.arange(256)
        pairs = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).reshape(
            -1, 2
        )  # rows of 2 = one pair
        out = apply_windows(pairs, spec).tolist()
        rnd = rounding == "round"
        for (a1, a2), got in zip(pairs.tolist(), out):
            assert tuple(got) == ref_pair(a1, a2, bits, options, rnd), (
                bits,
                options,
                rounding,
                a1,
                a2,
            )


def test_bsparq_ignores_partners_and_odd_tail_pairs_with_zero():
    spec_b = SparqSpec(bits=4, options=5, vsparq=False)
    spec_v = SparqSpec(bits=4, options=5, vsparq=True)
    x = torch.tensor([[0, 255, 201, 77, 133]])
    assert apply_windows(x, spec_b).tolist() == [
        [ref_window(v, (4, 5), True) for v in x[0].tolist()]
    ]
    # pairs (0,255) (201,77) (133, implicit 0): 255 and 133 keep all 8 bits
    got = apply_windows(x, spec_v).tolist()[0]
    assert got == [0, 255, ref_window(201, (4, 5), True), ref_window(77, (4, 5), True), 133]


def test_sign_magnitude_is_odd_and_int8_mode_keeps_codes():
    spec = SparqSpec(bits=3, options=6)
    q = torch.arange(-127, 128).reshape(1, -1).float()
    out = sparq_codes(q, spec, signed=True)
    mag = apply_windows(q.abs().long(), spec)
    assert torch.equal(out.abs().long(), mag) and torch.equal(torch.sign(out), torch.sign(q))
    spec8 = SparqSpec(bits=3, options=6, signed_mode="int8")
    assert torch.equal(sparq_codes(q, spec8, signed=True), q)


def test_act_quantizer_applies_windows_and_counts():
    aq = ActQuantizer(QuantSpec(8, signed=False, symmetric=True))
    aq.set_range(torch.tensor(0.0), torch.tensor(2.55))  # scale 0.01
    aq.sparq = SparqSpec(bits=4, options=5)
    aq.sparq_stats = SparqStats()
    x = torch.tensor([[0.0, 1.83, 2.01, 0.77, 0.0, 0.0, 0.07]])
    codes = [0, 183, 201, 77, 0, 0, 7]
    expected = [0, 183, ref_window(201, (4, 5), True), ref_window(77, (4, 5), True), 0, 0, 7]
    assert torch.allclose(aq(x), torch.tensor([expected]) * aq.scale)
    s = aq.sparq_stats.summary(aq.sparq, signed=False)
    # pairs (0,183) (201,77) (0,0) (7,pad 0): three pairs with a zero, one with both zero
    assert s["pairs"] == 4 and s["zero_pair_share"] == 0.75 and s["both_zero_pair_share"] == 0.25
    assert s["zero_share"] == 3 / 7
    # non-zero values: 183 (8-bit, partner 0), 201 (4), 77 (4), 7 (8-bit, tail): mean width 6
    assert s["effective_bits"] == pytest.approx(6.0)
    exact = sum(1 for c, e in zip(codes, expected) if c and c == e)
    assert s["exact_nonzero_share"] == pytest.approx(exact / 4)


def test_bad_specs():
    with pytest.raises(ConfigError):
        SparqSpec(bits=4, options=4)
    with pytest.raises(ConfigError):
        SparqSpec(rounding="nearest")
    with pytest.raises(ConfigError):
        apply_windows(torch.tensor([[256, 1]]), SparqSpec())
