"""SPARQ's bit windows (Shomron et al., NeurIPS 2021): the integer arithmetic, simulated bit-exactly.

The `sparq` method (`embq.dense.methods.sparq`) calibrates the towers and attaches these windows to
their activation quantizers; this module is the quantizer-level primitive they share.


Activations are first quantized to 8-bit codes (the base model). Each code then keeps only an
n-bit *window* of its bits (bSPARQ), placed at its leading one; the window may start at a few
allowed positions only (the "options"), and the bits below it are truncated (`raw`) or rounded
half-to-even with saturation (`round`). vSPARQ takes the codes in pairs along the dot-product
dimension (inputs 2k and 2k+1 of a Linear): when one member of a pair is zero the other gets
the pair's whole 2n-bit budget (a 2n-bit window, which is the full code for n = 4).

Window placements, as the window's lowest bit position (n = window bits):

    n = 4  5opt {4, 3, 2, 1, 0} (masks F0 78 3C 1E 0F), 3opt {4, 2, 0} (F0 3C 0F), 2opt {4, 0}
    n = 3  6opt {5, 4, 3, 2, 1, 0};   n = 2  7opt {6, ..., 0};   n = 6  3opt {2, 1, 0}

A code uses the lowest allowed window that still holds its leading one (codes below 2^n are
exact). Everything here is integer arithmetic on codes in [0, 255]: a 256-entry lookup table
per (n, options, rounding).

Signed inputs (DLRM's top-MLP input): the base quantizer is then symmetric int8, and windows are
applied to the 7-bit magnitude |q| <= 127 in sign-magnitude form (sign carried separately, one
extra bit); a pair member is "zero" when its magnitude is 0. `signed_mode="int8"` keeps signed
layers at plain 8 bits instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from embq.errors import ConfigError

#: allowed window-LSB positions per (window bits, option count), highest first.
PLACEMENTS: dict[tuple[int, int], tuple[int, ...]] = {
    (4, 5): (4, 3, 2, 1, 0),
    (4, 3): (4, 2, 0),
    (4, 2): (4, 0),
    (3, 6): (5, 4, 3, 2, 1, 0),
    (2, 7): (6, 5, 4, 3, 2, 1, 0),
    (6, 3): (2, 1, 0),
    (8, 1): (0,),
}
#: the option counts the reference kernel supports for each window width.
DEFAULT_OPTIONS = {4: 5, 3: 6, 2: 7, 6: 3, 8: 1}


@dataclass(frozen=True)
class SparqSpec:
    """Args:
    bits: window bits per activation (4, 3 or 2; 8 = the plain 8-bit base).
    options: window placements (4 bits: 5, 3 or 2; 3 bits: 6; 2 bits: 7).
    rounding: 'round' (half to even, saturating) or 'raw' (truncate).
    vsparq: pair activations and give a zero's budget to its partner.
    signed_mode: 'sign-magnitude' (windows on |q|) or 'int8' (signed layers stay 8-bit).
    """

    bits: int = 4
    options: int = 5
    rounding: str = "round"
    vsparq: bool = True
    signed_mode: str = "sign-magnitude"

    def __post_init__(self) -> None:
        if (self.bits, self.options) not in PLACEMENTS:
            raise ConfigError(
                f"SPARQ supports windows {sorted(PLACEMENTS)} as (bits, options), "
                f"got ({self.bits}, {self.options})."
            )
        if self.rounding not in ("round", "raw"):
            raise ConfigError(f"SPARQ rounding must be 'round' or 'raw', got {self.rounding!r}.")
        if self.signed_mode not in ("sign-magnitude", "int8"):
            raise ConfigError(
                f"SPARQ signed_mode must be 'sign-magnitude' or 'int8', got {self.signed_mode!r}."
            )

    @property
    def name(self) -> str:
        return f"{'v' if self.vsparq else 'b'}SPARQ-{self.bits}b-{self.options}opt-{self.rounding}"

    @property
    def pair_options(self) -> int:
        """Options of the 2n-bit window a survivor gets when its partner is zero."""
        return DEFAULT_OPTIONS[min(8, 2 * self.bits)]

    def to_json(self) -> dict:
        return asdict(self)


def window_value(v: int, bits: int, placements: tuple[int, ...], round_: bool) -> int:
    """One 8-bit code through an n-bit window (scalar version of `window_table`)."""
    if v == 0:
        return 0
    lead = v.bit_length() - 1
    lsb = min(p for p in placements if p + bits - 1 >= lead)
    kept = v >> lsb
    if round_ and lsb > 0:
        rem = v & ((1 << lsb) - 1)
        half = 1 << (lsb - 1)
        if rem > half or (rem == half and kept & 1):
            kept += 1
        kept = min(kept, (1 << bits) - 1)  # saturate inside the window
    return kept << lsb


def window_table(bits: int, options: int, rounding: str = "round") -> torch.Tensor:
    """int64 lookup table [256]: code -> windowed code."""
    if (bits, options) not in PLACEMENTS:
        raise ConfigError(f"No SPARQ window with {bits} bits and {options} options.")
    placements = PLACEMENTS[(bits, options)]
    return torch.tensor(
        [window_value(v, bits, placements, rounding == "round") for v in range(256)],
        dtype=torch.int64,
    )


_TABLES: dict[tuple[int, int, str], torch.Tensor] = {}


def _table(bits: int, options: int, rounding: str) -> torch.Tensor:
    key = (bits, options, rounding)
    if key not in _TABLES:
        _TABLES[key] = window_table(*key)
    return _TABLES[key]


def apply_windows(codes: torch.Tensor, spec: SparqSpec) -> torch.Tensor:
    """Windowed magnitudes for integer codes in [0, 255] (any shape; pairs along the last dim).

    Returns an int64 tensor of the same shape.
    """
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 255):
        raise ConfigError("SPARQ windows need 8-bit codes in [0, 255].")
    narrow = _table(spec.bits, spec.options, spec.rounding)[c]
    if not spec.vsparq:
        return narrow
    k = c.shape[-1]
    pad = k % 2
    if pad:  # an odd tail pairs with an implicit zero
        c = torch.nn.functional.pad(c, (0, 1))
        narrow = torch.nn.functional.pad(narrow, (0, 1))
    pairs = c.reshape(*c.shape[:-1], -1, 2)
    partner_zero = (pairs == 0).flip(-1).reshape(c.shape)
    wide = _table(min(8, 2 * spec.bits), spec.pair_options, spec.rounding)[c]
    out = torch.where(partner_zero, wide, narrow)
    return out[..., :k] if pad else out


def sparq_codes(codes: torch.Tensor, spec: SparqSpec, signed: bool) -> torch.Tensor:
    """SPARQ on the integer codes of one activation quantizer (unsigned [0, 255], or signed
    symmetric int8 [-127, 127] handled in sign-magnitude form)."""
    if not signed:
        return apply_windows(codes, spec).to(codes.dtype)
    if spec.signed_mode == "int8":
        return codes
    mag = codes.abs().to(torch.int64)
    return torch.sign(codes) * apply_windows(mag, spec).to(codes.dtype)


@dataclass
class SparqStats:
    """Counts over the activations one quantizer has seen."""

    values: int = 0
    zeros: int = 0
    pairs: int = 0
    pairs_with_zero: int = 0
    pairs_both_zero: int = 0
    exact_nonzero: int = 0
    bits_nonzero: float = 0.0  # sum over non-zero values of the window width they got

    def update(
        self, codes: torch.Tensor, windowed: torch.Tensor, spec: SparqSpec, signed: bool
    ) -> None:
        mag = codes.abs().to(torch.int64)
        if mag.shape[-1] % 2:
            mag = torch.nn.functional.pad(mag, (0, 1))
            windowed = torch.nn.functional.pad(windowed, (0, 1))
        pairs = (mag == 0).reshape(*mag.shape[:-1], -1, 2)
        nz = mag != 0
        self.values += int(codes.numel())
        self.zeros += int(codes.numel() - nz.sum())
        self.pairs += int(pairs.shape[:-1].numel())
        self.pairs_with_zero += int(pairs.any(-1).sum())
        self.pairs_both_zero += int(pairs.all(-1).sum())
        self.exact_nonzero += int(((windowed.abs().to(torch.int64) == mag) & nz).sum())
        partner_zero = pairs.flip(-1).reshape(mag.shape)
        width = torch.full(mag.shape, float(spec.bits))
        if spec.vsparq:
            width[partner_zero] = float(min(8, 2 * spec.bits))
        if signed and spec.signed_mode == "int8":
            width.fill_(8.0)
        self.bits_nonzero += float(width[nz].sum())

    def summary(self, spec: SparqSpec, signed: bool) -> dict:
        nonzero = max(1, self.values - self.zeros)
        sign_bit = 1 if signed and spec.signed_mode == "sign-magnitude" else 0
        return {
            "values": self.values,
            "zero_share": self.zeros / max(1, self.values),
            "pairs": self.pairs,
            "zero_pair_share": self.pairs_with_zero / max(1, self.pairs),
            "both_zero_pair_share": self.pairs_both_zero / max(1, self.pairs),
            "exact_nonzero_share": self.exact_nonzero / nonzero,
            # mean window width a non-zero activation is multiplied with (n, or 2n when its partner
            # is zero), plus the sign bit of sign-magnitude layers
            "effective_bits": self.bits_nonzero / nonzero + sign_bit,
            "sign_bit": sign_bit,
        }
