"""Typed table-format configs: what one embedding table becomes, every parameter settable.

A config parses from and prints to a format name, in the spirit of faiss's factory strings; the
short names are the stable form, and parameters that differ from their defaults follow in
parentheses::

    fp32, fp16                   Float(bits=32 | 16)
    int8, int4, int2             Rowwise(bits, search="minmax")            fbgemm / TorchRec min/max
    int4-greedy, int2-greedy     Rowwise(bits, "greedy", n_bins=200, ratio=0.16)      EMB4 GREEDY
    int4-opt, int2-opt           Rowwise(bits, "opt", n_bins=200)            embq's better search
    cb4-row                      RowCodebook()                 per-row 16-centroid codebook
    cb4-shared                   SharedCodebook(sample_rows=65536, seed=0)   one codebook a table
    pq<M>x<bits>                 PQ(m, bits, sample_rows=65536, seed=0)    faiss product quantizer

    int4-greedy(n_bins=100,ratio=0.2)      pq8x8(sample_rows=20000,seed=3)

`parse_format(str(c)) == c` for every config. This module imports neither numpy, torch nor faiss;
`config.codec()` builds the `embq.embedding.formats.TableFormat` that encodes and decodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from embq.errors import ConfigError

DEFAULT_SAMPLE_ROWS = 65_536  # rows drawn (seeded) to fit a table-level codebook
GREEDY_N_BINS, GREEDY_RATIO = 200, 0.16  # ATen's defaults for `choose_qparams_optimized`
ROWWISE_BITS = (8, 4, 2)
SEARCHES = ("minmax", "greedy", "opt")


def _check_int(owner: str, name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high
    ):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"The {name!r} parameter of {owner} must be an integer {bound}. "
                          f"Got {value!r} instead.")  # fmt: skip
    return int(value)


class FormatConfig:
    """Base of the table-format configs (frozen dataclasses). `str(config)` is its name."""

    # parameters printed only when they differ from these defaults, in this order
    _PARAMS: ClassVar[tuple[str, ...]] = ()

    @property
    def family(self) -> str:
        """The short name without parameters ("int4-greedy", "pq8x8", ...)."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """"float", "rowwise", "row-codebook", "shared-codebook" or "pq"."""
        raise NotImplementedError

    def codec(self) -> Any:
        """The `TableFormat` that encodes and decodes rows in this format."""
        raise NotImplementedError

    @property
    def fits_params(self) -> bool:
        """Whether the format learns table-level params from a row sample (codebooks)."""
        return False

    def __str__(self) -> str:
        defaults = {f.name: f.default for f in fields(self)}  # type: ignore[arg-type]
        extra = [f"{k}={getattr(self, k)!r}" for k in self._PARAMS
                 if getattr(self, k) != defaults[k]]  # fmt: skip
        return self.family + (f"({','.join(extra)})" if extra else "")


@dataclass(frozen=True, eq=True)
class Float(FormatConfig):
    """fp32 / fp16: the raw little-endian bytes of each row (fbgemm TBE FP32 / FP16)."""

    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (32, 16):
            raise ConfigError(f"The 'bits' parameter of Float must be 32 or 16. Got {self.bits!r} instead.")

    @property
    def family(self) -> str:
        return f"fp{self.bits}"

    @property
    def kind(self) -> str:
        return "float"

    def codec(self) -> Any:
        from embq.embedding.formats import FloatFormat

        return FloatFormat(str(self), "<f4" if self.bits == 32 else "<f2", f"FP{self.bits}", self.bits)


@dataclass(frozen=True, eq=True)
class Rowwise(FormatConfig):
    """Row-wise uniform `bits`-bit rows in fbgemm's fused layout (codes, fp16 scale, fp16 bias).

    Args:
        bits: 8, 4 or 2.
        search: how each row's clipping range is chosen: "minmax" (fbgemm / TorchRec), "greedy"
            (EMB4's GREEDY, byte-identical to ATen's optimized prepack; 4 and 2 bits) or "opt"
            (embq's better search; 4 and 2 bits).
        n_bins: grid of the greedy and opt searches: steps of range / n_bins.
        ratio: the most of a row's range that greedy may clip (greedy only).
    """

    bits: int = 4
    search: str = "minmax"
    n_bins: int = GREEDY_N_BINS
    ratio: float = GREEDY_RATIO
    _PARAMS: ClassVar[tuple[str, ...]] = ("n_bins", "ratio")

    def __post_init__(self) -> None:
        if self.bits not in ROWWISE_BITS:
            raise ConfigError(f"The 'bits' parameter of Rowwise must be one of {ROWWISE_BITS}. "
                              f"Got {self.bits!r} instead.")  # fmt: skip
        if self.search not in SEARCHES:
            raise ConfigError(f"The 'search' parameter of Rowwise must be one of {SEARCHES}. "
                              f"Got {self.search!r} instead.")  # fmt: skip
        if self.search != "minmax" and self.bits == 8:
            raise ConfigError("Rowwise(bits=8) has only the minmax search (int8); greedy and opt "
                              "searches exist for 4 and 2 bits")  # fmt: skip
        _check_int("Rowwise", "n_bins", self.n_bins, 2, 100_000)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
            0.0 <= self.ratio < 1.0
        ):
            raise ConfigError(f"The 'ratio' parameter of Rowwise must be a number in [0, 1). "
                              f"Got {self.ratio!r} instead.")  # fmt: skip
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.search == "minmax" and (self.n_bins, self.ratio) != (GREEDY_N_BINS, GREEDY_RATIO):
            raise ConfigError("n_bins and ratio set the greedy and opt searches; int8/int4/int2 "
                              "(minmax) take neither")  # fmt: skip
        if self.search == "opt" and self.ratio != GREEDY_RATIO:
            raise ConfigError("ratio limits greedy's clipping; the opt search has no such limit")

    @property
    def family(self) -> str:
        return f"int{self.bits}" + ("" if self.search == "minmax" else f"-{self.search}")

    @property
    def kind(self) -> str:
        return "rowwise"

    def codec(self) -> Any:
        from embq.embedding.formats import RowwiseFormat

        return RowwiseFormat(self)


@dataclass(frozen=True, eq=True)
class RowCodebook(FormatConfig):
    """cb4-row: each row keeps its own 16 fp16 centroids (optimal 1-D k-means) and 4-bit codes."""

    @property
    def family(self) -> str:
        return "cb4-row"

    @property
    def kind(self) -> str:
        return "row-codebook"

    def codec(self) -> Any:
        from embq.embedding.codebook import RowCodebookFormat

        return RowCodebookFormat()


@dataclass(frozen=True, eq=True)
class SharedCodebook(FormatConfig):
    """cb4-shared: per-row fp16 scale and offset, 4-bit codes into one 16-level codebook per
    table, fitted (faiss k-means) on `sample_rows` rows drawn with `seed`."""

    sample_rows: int = DEFAULT_SAMPLE_ROWS
    seed: int = 0
    _PARAMS: ClassVar[tuple[str, ...]] = ("sample_rows", "seed")

    def __post_init__(self) -> None:
        _check_int("SharedCodebook", "sample_rows", self.sample_rows, 1)
        _check_int("SharedCodebook", "seed", self.seed, 0)

    @property
    def family(self) -> str:
        return "cb4-shared"

    @property
    def kind(self) -> str:
        return "shared-codebook"

    @property
    def fits_params(self) -> bool:
        return True

    def codec(self) -> Any:
        from embq.embedding.codebook import SharedCodebookFormat

        return SharedCodebookFormat(str(self))


@dataclass(frozen=True, eq=True)
class PQ(FormatConfig):
    """pq<m>x<bits>: faiss product quantization, `m` sub-vectors of dim/m values with 2^bits
    centroids each, trained on `sample_rows` rows drawn with `seed`."""

    m: int = 8
    bits: int = 8
    sample_rows: int = DEFAULT_SAMPLE_ROWS
    seed: int = 0
    _PARAMS: ClassVar[tuple[str, ...]] = ("sample_rows", "seed")

    def __post_init__(self) -> None:
        _check_int("PQ", "m", self.m, 1)
        _check_int("PQ", "bits", self.bits, 1, 16)
        _check_int("PQ", "sample_rows", self.sample_rows, 1)
        _check_int("PQ", "seed", self.seed, 0)

    @property
    def family(self) -> str:
        return f"pq{self.m}x{self.bits}"

    @property
    def kind(self) -> str:
        return "pq"

    @property
    def fits_params(self) -> bool:
        return True

    def codec(self) -> Any:
        from embq.embedding.pq import PQFormat

        return PQFormat(self.m, self.bits, name=str(self))


# --------------------------------------------------------------------------- parsing

_NAME_RE = re.compile(r"^([a-z0-9\-]+)(?:\((.*)\))?$")
_PQ_RE = re.compile(r"^pq(\d+)x(\d+)$")
_INT_RE = re.compile(r"^-?\d+$")
_FAMILIES: dict[str, tuple[type[FormatConfig], dict[str, Any]]] = {
    "fp32": (Float, {"bits": 32}),
    "fp16": (Float, {"bits": 16}),
    **{f"int{b}": (Rowwise, {"bits": b, "search": "minmax"}) for b in ROWWISE_BITS},
    **{f"int{b}-{s}": (Rowwise, {"bits": b, "search": s}) for b in (4, 2) for s in ("greedy", "opt")},
    "cb4-row": (RowCodebook, {}),
    "cb4-shared": (SharedCodebook, {}),
}


def format_families() -> list[str]:
    """Every short format name; PQ appears as two examples (any pq<M>x<bits> parses)."""
    return [*_FAMILIES, "pq32x4", "pq16x8"]


def _parse_value(text: str) -> int | float:
    text = text.strip()
    if _INT_RE.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"format parameter value {text!r} is not a number") from None


def parse_format(name: Any) -> FormatConfig:
    """The config of a format name (see the module docstring), or a FormatConfig unchanged.

    Raises:
        ConfigError: an unknown name, a parameter the format does not take, or a bad value; the
            message lists the known names.
    """
    if isinstance(name, FormatConfig):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"a format is a name such as 'int4-greedy', got {type(name).__name__}")
    match = _NAME_RE.match(name.strip())
    if not match:
        raise ConfigError(
            f"unknown format {name!r}; valid formats: {', '.join(format_families())}"
        )
    family, arg_text = match.group(1), match.group(2)
    pq = _PQ_RE.match(family)
    if family in _FAMILIES:
        cls, fixed = _FAMILIES[family]
    elif pq:
        cls, fixed = PQ, {"m": int(pq.group(1)), "bits": int(pq.group(2))}
    else:
        raise ConfigError(
            f"unknown format {name!r}; valid formats: {', '.join(format_families())} "
            "(and any pq<M>x<bits>, M >= 1, bits 1..16)"
        )
    params: dict[str, Any] = {}
    if arg_text is not None and arg_text.strip():
        for item in arg_text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in cls._PARAMS:
                raise ConfigError(
                    f"format {family!r} takes parameters {list(cls._PARAMS) or 'none'}, "
                    f"got {item.strip()!r} in {name!r}"
                )
            params[key] = _parse_value(value)
    return cls(**fixed, **params)
