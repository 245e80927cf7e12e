"""Packing of low-bit codes into bytes, LSB first, as fbgemm lays them out.

Element j of a row goes into bits `(j % per_byte) * bits` of byte `j // per_byte`, where
per_byte = 8 / bits: for 4-bit codes element 0 is the low nibble. The same layout serves the
row-wise tables and the codebook formats; `pack_bitstream` extends it to widths that do not
divide 8 (the dense towers' 3/5/6/7-bit weights), one bit stream per tensor.
"""

from __future__ import annotations

import numpy as np


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes of packed codes for one row of `dim` values at `bits` bits (no qparams)."""
    per_byte = 8 // bits
    return (dim + per_byte - 1) // per_byte



def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes [n, d] LSB-first (element j in bits (j % per_byte) * bits of byte
    j // per_byte) into uint8 [n, packed_bytes(d, bits)]."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    n, d = codes.shape
    pad = (-d) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((n, pad), np.uint8)], axis=1)
    c = codes.reshape(n, (d + pad) // per_byte, per_byte)
    out = c[:, :, 0].copy()
    for k in range(1, per_byte):
        out |= c[:, :, k] << np.uint8(k * bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [n, packed_bytes] -> uint8 codes [n, dim]."""
    if bits == 8:
        return np.ascontiguousarray(packed[:, :dim], dtype=np.uint8)
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    n = packed.shape[0]
    shifts = (np.arange(per_byte, dtype=np.uint8) * np.uint8(bits))[None, None, :]
    codes = (packed[:, :, None] >> shifts) & mask
    return codes.reshape(n, packed.shape[1] * per_byte)[:, :dim]


def pack_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes < 2^bits (any shape, read flat) as one LSB-first bit stream: code j occupies bits
    j * bits ... j * bits + bits - 1 of the stream, byte 0 holding its first 8 bits. For bits in
    (1, 2, 4, 8) this is `pack_codes` of one row; 3, 5, 6 and 7 bits cross byte boundaries."""
    c = np.asarray(codes).reshape(-1).astype(np.uint8)
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)[None, :]) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bitstream(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bitstream`: the first `count` codes, uint8 [count]."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little")
    if flat.size < count * bits:
        raise ValueError(f"{flat.size} bits hold fewer than {count} codes of {bits} bits")
    planes = flat[: count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)[None, :]).sum(1).astype(np.uint8)
