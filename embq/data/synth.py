"""Synthetic Criteo-format data: the exact raw TSV layout, seeded, at any size, in bounded memory.

Real Criteo rows may not be redistributed, so tests and the demo use this generator. It writes
what the raw files hold (label, 13 counts, 26 8-hex-digit hashes, tab-separated, with empty
fields for missing values, -1 in I2 and, optionally, trailing empty fields stripped), and the
labels come from a hidden teacher so that a DLRM can learn them:

    logit = bias + sum_j w_j * z(log1p(I_j))                 (dense counts)
          + sum_f a_f * e_f(rank_f)                          (one effect per categorical value)
          + sum_(f,g) <u_f(rank_f), u_g(rank_g)> * c         (low-rank pairwise interactions)

Categorical values are drawn with Zipf-like frequencies over per-feature cardinalities shaped
like Criteo's (a few features with millions of values, many small ones); a value's effect and
latent vector are pseudo-random functions of (feature, rank), computed from a hash, so nothing
grows with the cardinality. Frequent values are seen (and trained) far more than rare ones.

Rows are produced in fixed blocks, each from its own seeded generator, so the output depends
only on (config, seed, rows), never on memory or chunking choices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from embq.data.criteo import N_CAT, N_INT
from embq.errors import ConfigError
from embq.progress import progress_bar

BLOCK_ROWS = 65536
LATENT_DIM = 4

# Shaped like Criteo's (TorchRec's 1TB defaults) scaled down 1/20, floored at 3: a few features
# with ~1-2M values and many small ones.
DEFAULT_CARDINALITIES = [
    2291659, 1837, 862, 370, 1012, 3, 355, 72, 3, 1463763, 78608, 17256, 3, 110, 563, 6, 3, 48, 3,
    2446872, 565839, 2004726, 22605, 630, 5, 3,
]
DEFAULT_INT_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22]
DEFAULT_CAT_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
                       0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]
# Interacting feature pairs of the teacher (index pairs among the 26 categoricals).
DEFAULT_PAIRS = [(0, 1), (2, 3), (4, 9), (10, 13), (14, 23), (6, 15), (1, 20), (3, 8)]


@dataclass
class SynthConfig:
    """What the generator draws.

    Args:
        cardinalities: distinct values per categorical feature (26).
        zipf_exponent: s of the power law P(rank r) ~ (r + 1) ** -s.
        int_missing: probability that each integer field is empty (13).
        cat_missing: probability that each categorical field is empty (26).
        strip_fraction: share of rows whose trailing empty fields are stripped (a quirk of
            circulating copies).
        negative_rate: share of I2 values written as -1.
        base_logit: teacher bias; -1.2 gives a click rate near Criteo's ~25%.
        signal: scale of the teacher's feature effects (larger: easier to learn).
    """

    cardinalities: list[int] = field(default_factory=lambda: list(DEFAULT_CARDINALITIES))
    zipf_exponent: float = 1.15
    int_missing: list[float] = field(default_factory=lambda: list(DEFAULT_INT_MISSING))
    cat_missing: list[float] = field(default_factory=lambda: list(DEFAULT_CAT_MISSING))
    strip_fraction: float = 0.3
    negative_rate: float = 0.05
    base_logit: float = -1.6
    signal: float = 1.0
    pairs: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_PAIRS))

    def __post_init__(self) -> None:
        if len(self.cardinalities) != N_CAT or any(c < 1 or c > 2**32 for c in self.cardinalities):
            raise ConfigError(f"cardinalities must be {N_CAT} values in [1, 2**32].")
        if len(self.int_missing) != N_INT or len(self.cat_missing) != N_CAT:
            raise ConfigError(f"Expected {N_INT} integer and {N_CAT} categorical missing rates.")
        rates = [*self.int_missing, *self.cat_missing, self.strip_fraction, self.negative_rate]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ConfigError("Missing rates, strip_fraction and negative_rate must be in [0, 1].")
        if self.zipf_exponent <= 1.0:
            raise ConfigError("zipf_exponent must be > 1.")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective scramble of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3 finaliser: a bijection of uint32, so distinct ranks give distinct hashes."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def value_hash(feature: int, rank: np.ndarray) -> np.ndarray:
    """The 32-bit hash written for the value of rank `rank` of categorical `feature`."""
    salted = (rank.astype(np.uint64) + np.uint64(0x9E3779B9) * np.uint64(feature + 1)) & np.uint64(0xFFFFFFFF)
    return _fmix32(salted)


def hidden_normal(feature: int, rank: np.ndarray, salt: int) -> np.ndarray:
    """A standard normal that is a fixed function of (feature, rank, salt): the teacher's weights."""
    key = rank.astype(np.uint64) ^ (np.uint64(feature + 1) << np.uint64(40)) ^ (np.uint64(salt) << np.uint64(56))
    u = (_mix64(key) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return ndtri(np.clip(u, 1e-12, 1 - 1e-12))


def zipf_ranks(rng: np.random.Generator, n: int, cardinality: int, s: float) -> np.ndarray:
    """Ranks in [0, cardinality) drawn from a continuous power law ~ (r + 1) ** -s (inverse CDF)."""
    u = rng.random(n)
    top = (cardinality + 1.0) ** (1.0 - s)
    r = ((top - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
    return np.minimum(np.floor(r).astype(np.int64) - 1, cardinality - 1)


@dataclass
class SynthBlock:
    labels: np.ndarray        # int32 (n,)
    ints: np.ndarray          # int64 (n, 13)
    int_missing: np.ndarray   # bool (n, 13)
    ranks: np.ndarray         # int64 (n, 26)
    cat_missing: np.ndarray   # bool (n, 26)
    strip: np.ndarray         # bool (n,)

    def head(self, n: int) -> SynthBlock:
        return SynthBlock(*(getattr(self, k)[:n] for k in
                            ("labels", "ints", "int_missing", "ranks", "cat_missing", "strip")))


# Per-feature teacher weights: fixed, seed-independent shapes of the task.
_DENSE_W = np.array([0.35, -0.25, 0.2, 0.3, -0.15, 0.25, 0.2, -0.3, 0.15, 0.2, -0.2, 0.1, 0.15])
_INT_LOGMEAN = np.array([1.0, 3.0, 2.5, 1.8, 8.0, 4.0, 1.5, 2.5, 4.0, 0.3, 1.0, 0.5, 2.0])
_INT_LOGSTD = np.array([1.2, 1.8, 1.5, 1.0, 2.0, 1.8, 1.3, 1.2, 1.5, 0.6, 0.9, 1.0, 1.2])


def _cat_weight(cardinality: int) -> float:
    """Effect scale of a feature: small vocabularies carry less signal per value."""
    return 0.25 + 0.35 * min(np.log10(cardinality + 1) / 6.0, 1.0)


def generate_block(config: SynthConfig, seed: int, block_index: int, n: int) -> SynthBlock:
    """`n` rows of block `block_index`: the same (config, seed, block) always gives the same rows."""
    rng = np.random.default_rng([seed, block_index])
    latent = rng.normal(_INT_LOGMEAN, _INT_LOGSTD, size=(n, N_INT))
    ints = np.maximum(np.floor(np.expm1(np.maximum(latent, 0.0))), 0).astype(np.int64)
    negative = rng.random(n) < config.negative_rate
    ints[negative, 1] = -1
    int_missing = rng.random((n, N_INT)) < np.asarray(config.int_missing)
    ranks = np.empty((n, N_CAT), dtype=np.int64)
    for f, card in enumerate(config.cardinalities):
        ranks[:, f] = zipf_ranks(rng, n, card, config.zipf_exponent)
    cat_missing = rng.random((n, N_CAT)) < np.asarray(config.cat_missing)

    dense = np.log1p(np.maximum(ints, 0)).astype(np.float64)
    dense_z = (dense - _INT_LOGMEAN) / (_INT_LOGSTD + 1.0)
    logit = config.base_logit + (np.where(int_missing, 0.0, dense_z) @ _DENSE_W)
    for f, card in enumerate(config.cardinalities):
        effect = _cat_weight(card) * hidden_normal(f, ranks[:, f], salt=1)
        logit += config.signal * np.where(cat_missing[:, f], 0.0, effect)
    for f, g in config.pairs:
        u = np.stack([hidden_normal(f, ranks[:, f], salt=2 + k) for k in range(LATENT_DIM)], 1)
        v = np.stack([hidden_normal(g, ranks[:, g], salt=2 + k) for k in range(LATENT_DIM)], 1)
        both = ~(cat_missing[:, f] | cat_missing[:, g])
        logit += config.signal * 0.3 * np.where(both, (u * v).sum(1), 0.0)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    strip = rng.random(n) < config.strip_fraction
    return SynthBlock(labels, ints, int_missing, ranks, cat_missing, strip)


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)
INT_WIDTH = 20  # int64 counts plus a sign


def _decimal_slots(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """uint8 (n, INT_WIDTH): right-aligned ASCII decimals, 0 bytes (dropped later) elsewhere."""
    n = len(values)
    out = np.zeros((n, INT_WIDTH), dtype=np.uint8)
    mag = np.abs(values)
    ndig = np.ones(n, dtype=np.int64)
    for k in range(1, INT_WIDTH - 1):
        ndig += mag >= 10**k
    rest = mag.copy()
    for k in range(INT_WIDTH - 1):
        col = INT_WIDTH - 1 - k
        out[:, col] = np.where(k < ndig, _DIGITS[rest % 10], 0)
        rest //= 10
    sign_col = INT_WIDTH - 1 - ndig
    neg = values < 0
    out[np.flatnonzero(neg), sign_col[neg]] = ord("-")
    out[missing] = 0
    return out


def format_block(block: SynthBlock, config: SynthConfig) -> bytes:
    """The raw TSV bytes of a block, built as one byte matrix whose 0 bytes are then dropped."""
    n = len(block.labels)
    pieces: list[np.ndarray] = [(ord("0") + block.labels).astype(np.uint8)[:, None]]
    present = np.ones((n, 1 + N_INT + N_CAT), dtype=bool)
    present[:, 1:1 + N_INT] = ~block.int_missing
    present[:, 1 + N_INT:] = ~block.cat_missing
    # A stripped row loses the tabs of its trailing empty fields.
    last_present = (present.shape[1] - 1) - np.argmax(present[:, ::-1], axis=1)
    keep_tab = np.ones((n, present.shape[1] - 1), dtype=bool)
    field_index = np.arange(1, present.shape[1])
    keep_tab[block.strip] = field_index[None, :] <= last_present[block.strip, None]

    tab = np.uint8(ord("\t"))
    for j in range(N_INT):
        pieces.append(np.where(keep_tab[:, j], tab, 0).astype(np.uint8)[:, None])
        pieces.append(_decimal_slots(block.ints[:, j], block.int_missing[:, j]))
    for f in range(N_CAT):
        hashes = value_hash(f, block.ranks[:, f]).astype(np.uint64)
        shifts = np.arange(28, -1, -4, dtype=np.uint64)
        hexes = _HEX[((hashes[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.int64)]
        hexes[block.cat_missing[:, f]] = 0
        pieces.append(np.where(keep_tab[:, N_INT + f], tab, 0).astype(np.uint8)[:, None])
        pieces.append(hexes)
    pieces.append(np.full((n, 1), ord("\n"), dtype=np.uint8))
    matrix = np.concatenate(pieces, axis=1).ravel()
    return matrix[matrix != 0].tobytes()


def write_synthetic(output: str | os.PathLike, rows: int, seed: int = 0,
                    config: SynthConfig | None = None, progress: bool = True) -> Path:
    """Write `rows` synthetic rows in Criteo's raw layout to `output` (refuses to overwrite).

    Memory is bounded by one block of BLOCK_ROWS rows; the file appears under its name only
    when complete.
    """
    config = config or SynthConfig()
    output = Path(output)
    if rows < 0:
        raise ConfigError(f"rows must be >= 0, got {rows}.")
    if output.exists():
        raise ConfigError(f"{output} already exists; choose another --output or remove it first.")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "wb") as f, progress_bar(
        enabled=progress, total=rows, unit="row", desc="synth"
    ) as bar:
        for b, start in enumerate(range(0, rows, BLOCK_ROWS)):
            n = min(BLOCK_ROWS, rows - start)
            # Always draw a whole block, then keep n rows: a file is a prefix of any longer one.
            block = generate_block(config, seed, b, BLOCK_ROWS)
            f.write(format_block(block.head(n), config))
            bar.update(n)
    os.replace(partial, output)
    return output
