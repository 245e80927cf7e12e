"""Writing a report: report.json (the numbers), report.md (for a pull request or a terminal) and
report.html (one self-contained file: inline CSS, plots as inline SVG, no script, no network).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from embq.files import staged_file

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:72rem;padding:0 1rem;color:#222;line-height:1.4}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:1rem 0}figcaption{font-weight:600;margin-bottom:.3rem}
svg{max-width:100%;height:auto}.note{color:#555;font-size:.85rem}
"""


def _fmt(value: Any, digits: int = 5) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return str(value)


HEADLINE = [("model", "name"), ("bytes (tables)", "bytes_tables"), ("bytes (dense)", "bytes_dense"),
            ("size ratio", "size_ratio"), ("memory ratio", "memory_ratio"), ("AUC", "auc"),
            ("AUC change", "auc_delta"), ("[95% CI]", "auc_delta_ci95"), ("log loss", "logloss"),
            ("log-loss change %", "logloss_delta_pct"), ("[95% CI]", "logloss_delta_ci95"),
            ("NE", "ne"), ("calibration", "calibration")]  # fmt: skip
TABLE_COLUMNS = [("table", "name"), ("rows", "rows"), ("dim", "dim"), ("format", "format"),
                 ("kernel", "kernel"), ("bytes", "bytes"), ("memory bytes", "memory_bytes"),
                 ("relative MSE", "relative_mse"), ("lookup share", "lookup_share"),
                 ("looked-up rows' rel. MSE", "weighted_relative_mse"),
                 ("sensitivity", "sensitivity")]  # fmt: skip
DENSE_COLUMNS = [("layer", "layer"), ("method", "method"), ("W bits", "w_bits"),
                 ("A bits", "a_bits"), ("output rel. error", "relative_error")]  # fmt: skip


def _headline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    fp32 = {**report["fp32"], "name": "fp32", "size_ratio": 1.0, "memory_ratio": 1.0}
    return [fp32, *report["artifacts"]]


def _cells(row: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    out = []
    for _, key in columns:
        value = row.get(key)
        if isinstance(value, dict):  # sensitivity: {format: delta}
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        out.append(_fmt(value))
    return out


def _md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(r, columns)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, columns))
                   + "</tr>" for r in rows)  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sections(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]], list[tuple[str, str]]]]:
    """(heading, rows, columns) of every table the report shows."""
    if "b_vs_a" in report:  # a comparison
        a, b = report["a"]["name"], report["b"]["name"]
        cols = [("table", "name"), (f"format {a}", "format_a"), (f"format {b}", "format_b"),
                (f"bytes {a}", "bytes_a"), (f"bytes {b}", "bytes_b"), (f"error {a}", "error_a"),
                (f"error {b}", "error_b"), ("smaller", "smaller"), ("closer to fp32", "closer_to_fp32")]  # fmt: skip
        model_cols = [("model", "name"), ("plan", "plan"), ("bytes (tables)", "bytes_tables"),
                      ("bytes (total on disk)", "bytes_total"), ("AUC", "auc"),
                      ("log loss", "logloss"), ("NE", "ne"), ("calibration", "calibration")]  # fmt: skip
        head = [report["a"], report["b"]]
        change = [{"name": f"{b} vs {a}", **report["b_vs_a"]}]
        change_cols = [("", "name"), ("log-loss change %", "logloss_delta_pct"),
                       ("[95% CI]", "logloss_delta_ci95"), ("AUC change", "auc_delta"),
                       ("[95% CI]", "auc_delta_ci95"), ("bytes ratio", "bytes_ratio")]  # fmt: skip
        return [("Models", head, model_cols), (f"{b} against {a}", change, change_cols),
                ("Per table", report["tables"], cols)]
    sections = [("Headline: fp32 against each artifact", _headline_rows(report), HEADLINE)]
    for a in report["artifacts"]:
        sections.append((f"Tables of {a['name']}", a["tables"], TABLE_COLUMNS))
        if a.get("dense") and a["dense"].get("layers"):
            sections.append((f"Dense layers of {a['name']} ({a['dense']['kind']})",
                             a["dense"]["layers"], DENSE_COLUMNS))  # fmt: skip
    if report.get("uniform"):
        cols = [("format", "format"), ("bytes", "bytes"), ("size ratio", "size_ratio"),
                ("relative MSE", "relative_mse"), ("AUC", "auc"), ("log loss", "logloss"),
                ("log-loss change %", "logloss_delta_pct")]  # fmt: skip
        sections.append(("Every table in one format", report["uniform"], cols))
    return sections


def _title(report: dict[str, Any]) -> str:
    return "embq compare" if "b_vs_a" in report else "embq report"


def _intro(report: dict[str, Any]) -> str:
    if "b_vs_a" in report:
        return (f"Dataset {report['dataset']}, {report['held_out_rows']:,} held-out rows. Changes "
                f"are {report['b']['name']} relative to {report['a']['name']} (log loss in "
                "percent); intervals are 95% paired bootstrap intervals over the held-out rows. "
                "Per table, 'error' is the relative MSE of the rows the data looks up when the "
                "fp32 model was given, else over all rows.")  # fmt: skip
    return (f"Dataset {report['dataset']}, {report['held_out_rows']:,} held-out rows. Changes are "
            "relative to fp32 (log loss in percent); intervals are 95% paired bootstrap intervals "
            "over the held-out rows: an interval that contains 0 is a change the rows cannot tell "
            "from noise.")  # fmt: skip


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (tables only; the plots are in the HTML)."""
    parts = [f"# {_title(report)}", "", _intro(report), ""]
    for heading, rows, columns in _sections(report):
        parts += [f"## {heading}", "", _md_table(rows, columns), ""]
    parts.append("Plots (in report.html): " + ", ".join(report.get("plots", [])))
    return "\n".join(parts) + "\n"


def to_html(report: dict[str, Any], figures: dict[str, str]) -> str:
    """The report as one self-contained HTML page."""
    body = [f"<h1>{_title(report)}</h1><p class='note'>{html.escape(_intro(report))}</p>"]
    for heading, rows, columns in _sections(report):
        body.append(f"<h2>{html.escape(heading)}</h2>{_html_table(rows, columns)}")
    body.append("<h2>Plots</h2>")
    for title, svg in figures.items():
        body.append(f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}</figure>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_title(report)}: {html.escape(str(report.get('dataset')))}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], figures: dict[str, str], output: str | os.PathLike,
                 stem: str = "report") -> Path:  # fmt: skip
    """Write STEM.json, STEM.md and STEM.html into directory `output` (created if missing; each
    file replaced atomically). Returns the directory."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(_json_safe(report), indent=1, allow_nan=False)),
                         ("md", to_markdown(report)), ("html", to_html(report, figures))):  # fmt: skip
        with staged_file(out / f"{stem}.{suffix}") as tmp:
            tmp.write_text(text, encoding="utf-8")
    return out
