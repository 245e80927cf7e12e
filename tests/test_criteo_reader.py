"""The raw Criteo reader against hand-written lines covering every quirk of real files."""

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
