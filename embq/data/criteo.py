"""Streaming reader for raw Criteo TSV files (Kaggle `train.txt`, Terabyte `day_N`).

A raw line is 40 tab-separated fields: the 0/1 label, 13 integer counts I1..I13, then 26
categorical features C1..C26 written as 32-bit hashes in 8 hex digits. Real copies have quirks
that the reader accepts:

- any integer or categorical field may be empty (missing);
- integers may be negative (I2 holds -1);
- trailing empty fields may be stripped, leaving fewer than 40 fields: the row is padded back;
- CRLF line ends, a last line without a newline, an empty file;
- gzip-compressed files (Terabyte's `day_N.gz`), recognised by their magic bytes and
  decompressed as a stream, block by block.

Lines that cannot be a row (too many fields, a label other than 0/1, a non-integer count, a
categorical that is not 1-8 hex digits, an empty line, a byte that is not printable ASCII or a
tab: binary data, a stray carriage return) are refused: counted, reported with file and line
number, or raised at once with `strict=True`. A truncated or corrupt gzip stream stops the read
with a DataError naming the file.

Parsing is vectorised: the file is read in blocks of lines, fields are split by pandas' C parser
and validated column by column with numpy, so memory is bounded by the block, not the file.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embq.errors import DataError

N_INT, N_CAT = 13, 26
N_FIELDS = 1 + N_INT + N_CAT
INT_NAMES = [f"int_{i}" for i in range(N_INT)]  # TorchRec's DEFAULT_INT_NAMES
CAT_NAMES = [f"cat_{i}" for i in range(N_CAT)]  # TorchRec's DEFAULT_CAT_NAMES
MAX_REFUSALS_KEPT = 100

# ASCII byte -> hex nibble, 255 for anything that is not a hex digit (NUL marks string end).
_HEX_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_NIBBLE[_c] = 10 + _i

# The bytes a raw line may hold: printable ASCII and tab. Anything else (binary data, NUL, a lone
# '\r' that pandas would take for a line end) makes the line refused, never parsed.
_TEXT_BYTES = bytes([9, *range(0x20, 0x7F)])
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class RawChunk:
    """Valid rows of one block of a raw file.

    labels      int32  (n,)      0 / 1
    ints        int64  (n, 13)   counts, 0 where missing
    int_missing bool   (n, 13)
    cats        uint32 (n, 26)   32-bit hashes, 0 where missing
    cat_missing bool   (n, 26)
    """

    labels: np.ndarray
    ints: np.ndarray
    int_missing: np.ndarray
    cats: np.ndarray
    cat_missing: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Refusal:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ReadReport:
    """What a read saw: rows accepted and refused, and the first refusals with their lines."""

    rows_read: int = 0
    rows_refused: int = 0
    refusals: list[Refusal] = field(default_factory=list)

    def refuse(self, refusal: Refusal, strict: bool) -> None:
        if strict:
            raise DataError(f"Malformed Criteo line {refusal} (strict mode refuses it; "
                            "drop --strict to skip and count such lines).")
        self.rows_refused += 1
        if len(self.refusals) < MAX_REFUSALS_KEPT:
            self.refusals.append(refusal)


def _open_raw(path: Path) -> io.BufferedIOBase:
    """The file's bytes: decompressed as a stream when it is gzip (by its magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    if path.suffix == ".gz":
        raise DataError(f"{path} is named .gz but is not gzip-compressed (it starts with "
                        f"{magic!r}); rename it, or re-download it if it should be gzip.")
    return open(path, "rb")


def _read_blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, block of whole lines) over a plain or gzip file, CRLF turned
    into LF. Memory: about two blocks, whatever the file's size."""
    first_line, tail = 1, b""
    with _open_raw(path) as f:
        while True:
            try:
                data = f.read(block_bytes)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise DataError(
                    f"{path}: the gzip stream is truncated or corrupt after line {first_line - 1} "
                    f"({e}); the rows before it were read. "
                    "Check the file with `gzip -t` and download it again."
                ) from None
            if not data:
                break
            data = tail + data
            cut = data.rfind(b"\n")
            if cut < 0:
                tail = data
                continue
            block, tail = data[: cut + 1], data[cut + 1:]
            yield first_line, block.replace(b"\r\n", b"\n")
            first_line += block.count(b"\n")
    if tail.strip(b"\r\n"):
        yield first_line, tail.replace(b"\r\n", b"\n").rstrip(b"\r") + b"\n"


def _parse_hex(col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values uint32, missing, bad) of an object array of strings of at most 8 hex digits."""
    lengths = np.fromiter((len(s) for s in col), dtype=np.int64, count=len(col))
    too_long = lengths > 8
    raw = np.array([s if len(s) <= 8 else "" for s in col], dtype="S8")
    chars = raw.view(np.uint8).reshape(len(col), 8)
    nib = _HEX_NIBBLE[chars]
    present = chars != 0
    bad = too_long | np.any(present & (nib == 255), axis=1)
    values = np.zeros(len(col), dtype=np.uint64)
    for j in range(8):
        values = np.where(present[:, j], values * 16 + nib[:, j].astype(np.uint64), values)
    missing = lengths == 0
    return values.astype(np.uint32), missing, bad


def _parse_block(text: bytes, first_line: int, path: Path, report: ReadReport,
                 strict: bool) -> RawChunk | None:
    lines = text.split(b"\n")[:-1]
    good: list[bytes] = []
    good_numbers: list[int] = []
    binary = bool(text.translate(None, _TEXT_BYTES).strip(b"\n"))  # one C pass over the block
    for offset, line in enumerate(lines):
        tabs = line.count(b"\t")
        odd = line.translate(None, _TEXT_BYTES) if binary else b""
        if odd:
            report.refuse(Refusal(str(path), first_line + offset,
                                  f"byte 0x{odd[0]:02x} is not printable ASCII (binary data?)"),
                          strict)  # fmt: skip
        elif not line.strip():
            report.refuse(Refusal(str(path), first_line + offset, "empty line"), strict)
        elif tabs >= N_FIELDS:
            report.refuse(Refusal(str(path), first_line + offset,
                                  f"{tabs + 1} fields, at most {N_FIELDS} expected"), strict)
        else:
            # Stripped trailing empty fields: pad the row back to 40 fields.
            good.append(line + b"\t" * (N_FIELDS - 1 - tabs))
            good_numbers.append(first_line + offset)
    if not good:
        return None
    frame = pd.read_csv(io.BytesIO(b"\n".join(good)), sep="\t", header=None, names=range(N_FIELDS),
                        dtype=str, keep_default_na=False, na_filter=False, quoting=3,
                        engine="c")
    numbers = np.asarray(good_numbers)
    bad_reason = np.full(len(frame), "", dtype=object)

    labels_raw = frame[0].to_numpy()
    bad_label = ~np.isin(labels_raw, ["0", "1"])
    bad_reason[bad_label] = "label must be 0 or 1"

    ints = np.zeros((len(frame), N_INT), dtype=np.int64)
    int_missing = np.zeros((len(frame), N_INT), dtype=bool)
    for j in range(N_INT):
        col = frame[1 + j].to_numpy()
        missing = col == ""
        num = pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~missing & (np.isnan(num) | (num != np.round(num)) | (np.abs(num) > 2**62))
        bad_reason[bad & (bad_reason == "")] = f"I{j + 1} is not an integer"
        ints[:, j] = np.where(missing | bad, 0, np.nan_to_num(num)).astype(np.int64)
        int_missing[:, j] = missing

    cats = np.zeros((len(frame), N_CAT), dtype=np.uint32)
    cat_missing = np.zeros((len(frame), N_CAT), dtype=bool)
    for j in range(N_CAT):
        values, missing, bad = _parse_hex(frame[1 + N_INT + j].to_numpy())
        bad_reason[bad & (bad_reason == "")] = f"C{j + 1} is not a 32-bit hex hash"
        cats[:, j] = values
        cat_missing[:, j] = missing

    refused = bad_reason != ""
    for i in np.flatnonzero(refused):
        report.refuse(Refusal(str(path), int(numbers[i]), str(bad_reason[i])), strict)
    keep = ~refused
    report.rows_read += int(keep.sum())
    return RawChunk(labels=labels_raw[keep].astype(np.int32), ints=ints[keep],
                    int_missing=int_missing[keep], cats=cats[keep], cat_missing=cat_missing[keep])


def read_criteo(paths: str | os.PathLike | list, report: ReadReport | None = None,
                strict: bool = False, block_bytes: int = 16 << 20) -> Iterator[RawChunk]:
    """Valid rows of raw Criteo files, block by block, in file order.

    Args:
        paths: one file or a list (e.g. Terabyte day_0 ... day_23), read in the given order.
        report: filled with rows read / refused and the first refused lines.
        strict: raise DataError at the first malformed line instead of skipping it.
        block_bytes: bytes read per block; memory is bounded by a few times this.
    """
    report = report if report is not None else ReadReport()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"Criteo input {path} does not exist or is not a file.")
        for first_line, block in _read_blocks(path, block_bytes):
            chunk = _parse_block(block, first_line, path, report, strict)
            if chunk is not None and len(chunk):
                yield chunk
