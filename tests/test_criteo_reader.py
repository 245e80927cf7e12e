"""The raw Criteo reader against hand-written lines covering every quirk of real files."""

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from embq.data.criteo import N_FIELDS, ReadReport, read_criteo
from embq.errors import DataError


def row(label="1", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


def read_all(path, **kw):
    report = ReadReport()
    chunks = list(read_criteo(path, report, **kw))
    if not chunks:
        return None, report
    cat = {k: np.concatenate([getattr(c, k) for c in chunks])
           for k in ("labels", "ints", "int_missing", "cats", "cat_missing")}
    return cat, report


def write(tmp_path, text: str | bytes, name="day_0"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_full_row_values(tmp_path):
    cats = ["68fd1e64", "FFFFFFFF", "0", *[f"{i:08x}" for i in range(23)]]
    p = write(tmp_path, row("0", cats=cats) + "\n")
    got, report = read_all(p)
    assert report.rows_read == 1 and report.rows_refused == 0
    assert got["labels"].tolist() == [0]
    assert got["ints"][0].tolist() == list(range(13))
    assert got["cats"][0, :3].tolist() == [0x68FD1E64, 0xFFFFFFFF, 0]
    assert not got["int_missing"].any() and not got["cat_missing"].any()


def test_missing_values_and_negative_ints(tmp_path):
    ints = ["", "-1", "", *[str(i) for i in range(10)]]
    cats = ["", "abc", *[""] * 23, "0000beef"]
    p = write(tmp_path, row("1", ints, cats) + "\n")
    got, _ = read_all(p)
    assert got["ints"][0, :3].tolist() == [0, -1, 0]
    assert got["int_missing"][0, :3].tolist() == [True, False, True]
    assert got["cats"][0, 1] == 0xABC and got["cats"][0, 25] == 0xBEEF
    assert got["cat_missing"][0].sum() == 24


def test_stripped_trailing_fields_are_padded(tmp_path):
    full = row("1", cats=[f"{i:08x}" for i in range(10)] + [""] * 16)
    stripped = full.rstrip("\t")
    assert stripped.count("\t") < N_FIELDS - 1
    p = write(tmp_path, stripped + "\n" + "0\t5\n")
    got, report = read_all(p)
    assert report.rows_read == 2 and report.rows_refused == 0
    assert got["cat_missing"][0].tolist() == [False] * 10 + [True] * 16
    assert got["ints"][1, 0] == 5 and got["int_missing"][1, 1:].all() and got["cat_missing"][1].all()


def test_crlf_and_missing_final_newline(tmp_path):
    p = write(tmp_path, (row("1") + "\r\n" + row("0") + "\r\n" + row("1")).encode())
    got, report = read_all(p)
    assert got["labels"].tolist() == [1, 0, 1]
    assert got["cats"][:, 25].tolist() == [25, 25, 25]  # no '\r' glued to the last hash


def test_empty_file(tmp_path):
    got, report = read_all(write(tmp_path, b""))
    assert got is None and report.rows_read == 0 and report.rows_refused == 0


@pytest.mark.parametrize("bad, reason", [
    (row() + "\textra", "41 fields"),
    (row(label="2"), "label"),
    (row(label=""), "label"),
    (row(ints=["x1", *["1"] * 12]), "I1 is not an integer"),
    (row(ints=[*["1"] * 12, "1.5"]), "I13 is not an integer"),
    (row(cats=["12345678z", *["0"] * 25]), "C1"),
    (row(cats=[*["0"] * 25, "g0000000"]), "C26"),
    ("", "empty line"),
])
def test_malformed_lines_are_counted_with_file_and_line(tmp_path, bad, reason):
    p = write(tmp_path, row("1") + "\n" + bad + "\n" + row("0") + "\n")
    got, report = read_all(p)
    assert report.rows_read == 2 and report.rows_refused == 1
    assert got["labels"].tolist() == [1, 0]
    refusal = report.refusals[0]
    assert refusal.line == 2 and refusal.file == str(p) and reason in refusal.reason


def test_strict_mode_raises_at_the_bad_line(tmp_path):
    p = write(tmp_path, row("1") + "\n" + row("1") + "\n" + row(label="7") + "\n")
    with pytest.raises(DataError, match=r"day_0:3: label"):
        read_all(p, strict=True)


def test_line_numbers_across_blocks_and_files(tmp_path):
    lines = [row(str(i % 2)) for i in range(300)]
    lines[250] = row(label="x")
    a = write(tmp_path, "\n".join(lines) + "\n", "day_0")
    b = write(tmp_path, row("1") + "\n" + row(label="y") + "\n", "day_1")
    got, report = read_all([a, b], block_bytes=4096)  # many small blocks
    assert report.rows_read == 300
    assert [(r.file, r.line) for r in report.refusals] == [(str(a), 251), (str(b), 2)]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_criteo(tmp_path / "nope"))


# --------------------------------------------------------------------------- binary lines


@pytest.mark.parametrize("junk", [
    b"\xff\xfe\x00\x01",  # not UTF-8: pandas' decoder raised UnicodeDecodeError on it
    b"\x00",              # NUL
    b"\r",                # a lone CR: pandas' parser split the line in two and shifted numbers
    "é".encode(),         # valid UTF-8, still not a Criteo field
])
def test_binary_line_is_refused_with_file_and_line(tmp_path, junk):
    good = row("1")
    bad = good[:20].encode() + junk + good[20:].encode()
    p = write(tmp_path, good.encode() + b"\n" + bad + b"\n" + row("0").encode() + b"\n")
    got, report = read_all(p)
    assert report.rows_read == 2 and report.rows_refused == 1
    assert got["labels"].tolist() == [1, 0]
    assert (report.refusals[0].file, report.refusals[0].line) == (str(p), 2)
    assert "not printable ASCII" in report.refusals[0].reason
    with pytest.raises(DataError, match=r"day_0:2: byte 0x"):
        read_all(p, strict=True)


def test_binary_lines_keep_line_numbers_across_blocks(tmp_path):
    lines = [row(str(i % 2)).encode() for i in range(400)]
    for i in (3, 150, 399):
        lines[i] = b"\x8b\x1f garbage \xc3"
    p = write(tmp_path, b"\n".join(lines) + b"\n")
    got, report = read_all(p, block_bytes=4096)
    assert report.rows_read == 397
    assert [r.line for r in report.refusals] == [4, 151, 400]


# --------------------------------------------------------------------------- gzip


def gz(tmp_path, data: bytes, name="day_0.gz", members: int = 1) -> Path:
    """`data` gzip-compressed into `members` concatenated members (as `cat a.gz b.gz` makes)."""
    cuts = np.linspace(0, len(data), members + 1).astype(int)
    p = tmp_path / name
    p.write_bytes(b"".join(gzip.compress(data[a:b]) for a, b in zip(cuts[:-1], cuts[1:])))
    return p


@pytest.mark.parametrize("members", [1, 3])
def test_gzip_reads_like_the_plain_file(tmp_path, members):
    lines = [row(str(i % 2), cats=[f"{(i * 7919 + j) % 2**32:08x}" for j in range(26)]) for i in range(500)]
    lines[77] = row(label="x")
    text = ("\r\n".join(lines) + "\r\n").encode()
    plain = write(tmp_path, text, "day_0")
    packed = gz(tmp_path, text, members=members)
    a, ra = read_all(plain, block_bytes=16 << 10)  # several blocks, lines cut between them
    b, rb = read_all(packed, block_bytes=16 << 10)
    assert rb.rows_read == ra.rows_read == 499 and rb.rows_refused == 1
    assert (rb.refusals[0].file, rb.refusals[0].line) == (str(packed), 78)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    p = gz(tmp_path, (row("1") + "\n").encode(), name="day_0")
    got, _ = read_all(p)
    assert got["labels"].tolist() == [1]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gzip_is_a_data_error_naming_the_file(tmp_path, damage):
    rng = np.random.default_rng(0)  # random hashes: the stream does not compress to nothing
    lines = [row(cats=[f"{v:08x}" for v in rng.integers(0, 2**32, 26)]) for _ in range(2000)]
    p = gz(tmp_path, ("\n".join(lines) + "\n").encode())
    data = bytearray(p.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{p.name}: the gzip stream is truncated or corrupt"):
        read_all(p, block_bytes=64 << 10)


def test_gz_name_on_a_plain_file_is_refused(tmp_path):
    p = write(tmp_path, row("1") + "\n", name="day_0.gz")
    with pytest.raises(DataError, match="not gzip-compressed"):
        read_all(p)


def test_gzip_is_read_in_bounded_memory(tmp_path):
    """Python's allocations stay near one block, far below the decompressed file. Most lines
    have too many fields (refused before parsing, which keeps the test fast under tracemalloc)."""
    wide = "\t".join(["0"] * 600)  # 1.2 kB, 600 fields
    text = ("\n".join([row("1"), *[wide] * 3000, row("0")]) + "\n").encode()  # ~3.6 MB
    p = gz(tmp_path, text)
    assert p.stat().st_size < len(text) // 100
    tracemalloc.start()
    try:
        report = ReadReport()
        labels = [c.labels.tolist() for c in read_criteo(p, report, block_bytes=32 << 10)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels == [[1], [0]] and report.rows_refused == 3000
    assert peak < len(text) // 10, (peak, len(text))
