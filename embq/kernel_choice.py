"""The runtime's lookup-kernel choices (`embq.runtime`), torch-free so that command-line parsers
can offer them without importing torch."""

from __future__ import annotations

import argparse

# "auto": every row-wise table in fbgemm's TBE, rows of at most a cache line padded to a power of
# two (fastest lookups); "compact": 4-bit / 2-bit row-wise tables read in place from the
# memory-mapped artifact by ATen's n-bit ops (least memory), the others in the TBE unpadded;
# "tbe": every row-wise table in the TBE with unpadded rows (fbgemm's CPU default).
KERNEL_CHOICES = ("auto", "compact", "tbe")


def add_kernel_argument(parser: argparse.ArgumentParser) -> None:
    """Add --kernel {auto,compact,tbe} (default auto) to a command-line parser."""
    parser.add_argument(
        "--kernel",
        choices=KERNEL_CHOICES,
        default="auto",
        help="lookup kernels: auto (fastest; rows of at most 64 bytes padded to a power of two), "
        "compact (least memory: 4-/2-bit rows read in place from the memory-mapped artifact) or "
        "tbe (fbgemm's TBE, unpadded rows)",
    )
