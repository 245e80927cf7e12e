"""Packing of low-bit codes into bytes, LSB first, as fbgemm lays them out.

Element j of a row goes into bits `(j % per_byte) * bits` of byte `j // per_byte`, where
per_byte = 8 / bits: for 4-bit codes element 0 is the low nibble. The same layout serves the
row-wise tables, the codebook formats and the dense towers' low-bit weights.
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



def pack_codes_torch(codes, bits: int):
    """`pack_codes` for a uint8 torch tensor [n, d] (returns a torch tensor): the dense towers'
    codes go through the same layout."""
    import torch

    return torch.from_numpy(pack_codes(codes.to(torch.uint8).numpy(), bits))


def unpack_codes_torch(packed, bits: int, dim: int):
    """`unpack_codes` for a uint8 torch tensor (returns a torch tensor)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(unpack_codes(packed.numpy(), bits, dim)))
