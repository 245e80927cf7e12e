"""The report's plots, drawn with matplotlib and returned as self-contained SVG text.

Text stays text in the SVG (`svg.fonttype = none`), so titles and labels are searchable and
readable by screen readers; nothing refers to an external file or URL. Every plot has a title
and axis labels (tests check both).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# one colour per format family, stable across plots
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c", "#ccb974", "#64b5cd"]  # fmt: skip


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10,
                         "figure.dpi": 100, "svg.hashsalt": "embq"})  # fmt: skip
    return plt


def _svg(fig: Any) -> str:
    """The figure as an inline <svg> element (no XML prolog, no metadata block)."""
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def pareto_plot(points: list[dict[str, Any]]) -> str:
    """Bytes (fraction of fp32) against the log-loss change for uniform formats and artifacts;
    the Pareto front joined, plans highlighted.

    points: {"name", "size_ratio", "logloss_delta_pct", "kind": "uniform" | "artifact" | "plan"}.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"uniform": dict(marker="o", color="#8c8c8c", s=28, zorder=2),
              "artifact": dict(marker="s", color="#4c72b0", s=46, zorder=3),
              "plan": dict(marker="*", color="#c44e52", s=140, zorder=4)}  # fmt: skip
    for kind, style in styles.items():
        sel = [p for p in points if p["kind"] == kind]
        if sel:
            ax.scatter([p["size_ratio"] for p in sel], [p["logloss_delta_pct"] for p in sel],
                       label=kind, **style)  # fmt: skip
    for p in points:
        ax.annotate(p["name"], (p["size_ratio"], p["logloss_delta_pct"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p["size_ratio"] for p in front], [p["logloss_delta_pct"] for p in front],
                where="post", color="#55a868", lw=1, zorder=1, label="Pareto front")  # fmt: skip
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_title("Size against quality: bytes vs log-loss change")
    ax.set_xlabel("table bytes / fp32 table bytes")
    ax.set_ylabel("log-loss change vs fp32 (%)")
    ax.legend(loc="best", fontsize=7)
    return _svg(fig)


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both bytes and log-loss change, by bytes."""
    front, best = [], np.inf
    for p in sorted(points, key=lambda p: (p["size_ratio"], p["logloss_delta_pct"])):
        if p["logloss_delta_pct"] < best:
            front.append(p)
            best = p["logloss_delta_pct"]
    return front


def table_bytes_plot(tables: list[dict[str, Any]], title: str) -> str:
    """Bytes of each table, bars coloured by format (stacked bars of a table's parts are not
    needed: a table has one format)."""
    plt = _pyplot()
    colours = _colours([t["format"] for t in tables])
    fig, ax = plt.subplots(figsize=(max(6.4, 0.24 * len(tables)), 3.6))
    x = np.arange(len(tables))
    bottoms = np.zeros(len(tables))
    for fmt, colour in colours.items():
        heights = np.array([t["memory_bytes"] if t["format"] == fmt else 0 for t in tables], float)
        ax.bar(x, heights, bottom=bottoms, color=colour, label=fmt)
        bottoms += heights
    ax.set_xticks(x, [t["name"] for t in tables], rotation=90, fontsize=6)
    ax.set_title(title)
    ax.set_xlabel("table")
    ax.set_ylabel("bytes in memory")
    ax.legend(fontsize=7, title="format")
    return _svg(fig)


def bytes_by_format_plot(artifacts: list[dict[str, Any]]) -> str:
    """Each artifact's table bytes, stacked by format, next to fp32's."""
    plt = _pyplot()
    formats = [t["format"] for a in artifacts for t in a["tables"]]
    colours = _colours(formats)
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * (len(artifacts) + 1)))
    names = ["fp32"] + [a["name"] for a in artifacts]
    fp32 = sum(t["rows"] * t["dim"] * 4 for t in artifacts[0]["tables"]) if artifacts else 0
    ax.barh(0, fp32, color="#dddddd", label="fp32")
    for i, a in enumerate(artifacts, start=1):
        left = 0.0
        for fmt, colour in colours.items():
            width = sum(t["bytes"] for t in a["tables"] if t["format"] == fmt)
            if width:
                ax.barh(i, width, left=left, color=colour, label=fmt)
                left += width
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_title("Table bytes on disk, stacked by format")
    ax.set_xlabel("bytes")
    ax.set_ylabel("model")
    return _svg(fig)


def error_vs_share_plot(tables: list[dict[str, Any]], title: str) -> str:
    """Each table's error on the rows the data looks up against its share of the lookups.

    With one id per feature per row (Criteo, MovieLens) every table serves the same share of
    lookups; the x axis then shows the share of each table's rows that the lookups touch, and
    says so."""
    plt = _pyplot()
    colours = _colours([t["format"] for t in tables])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    shares = {round(t["lookup_share"], 9) for t in tables}
    key = "lookup_share" if len(shares) > 1 else "rows_touched_share"
    for fmt, colour in colours.items():
        sel = [t for t in tables if t["format"] == fmt]
        ax.scatter([t[key] for t in sel], [max(t["weighted_relative_mse"] or 0, 1e-12) for t in sel],
                   color=colour, label=fmt, s=24)  # fmt: skip
    for t in tables:
        ax.annotate(t["name"], (t[key], max(t["weighted_relative_mse"] or 0, 1e-12)),
                    fontsize=6, xytext=(2, 2), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("share of all lookups in the held-out rows" if key == "lookup_share" else
                  "share of the table's rows the held-out lookups touch "
                  "(every table serves an equal share of lookups here)")  # fmt: skip
    ax.set_ylabel("relative MSE of the looked-up rows (lookup-weighted)")
    ax.legend(fontsize=7, title="format")
    return _svg(fig)


def reliability_plot(labels: np.ndarray, probs: dict[str, np.ndarray], bins: int = 15) -> str:
    """Calibration: mean predicted click probability against the observed click rate, in bins
    of equal row counts (by the first model's scores), one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    first = next(iter(probs.values()))
    edges = np.quantile(first, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, first, side="right") - 1, 0, bins - 1)
    top = 0.0
    for name, p in probs.items():
        mean_p = np.array([p[which == b].mean() for b in range(bins) if (which == b).any()])
        rate = np.array([labels[which == b].mean() for b in range(bins) if (which == b).any()])
        ax.plot(mean_p, rate, marker="o", ms=3, lw=1, label=name)
        top = max(top, float(mean_p.max()), float(rate.max()))
    ax.plot([0, top], [0, top], color="black", lw=0.6, ls="--", label="perfect calibration")
    ax.set_title("Reliability: predicted vs observed click rate")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed click rate (bin)")
    ax.legend(fontsize=7)
    return _svg(fig)


def score_shift_plot(base: np.ndarray, probs: dict[str, np.ndarray]) -> str:
    """How far each quantized model's scores moved from fp32's: histograms of the per-row
    change in logit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)

    shifts = {name: logit(p) - logit(base) for name, p in probs.items()}
    span = max((float(np.percentile(np.abs(s), 99.5)) for s in shifts.values()), default=1.0)
    span = span if span > 0 else 1e-6
    grid = np.linspace(-span, span, 61)
    for name, s in shifts.items():
        ax.hist(np.clip(s, -span, span), bins=grid, histtype="step", lw=1.2, label=name)
    ax.set_title("Score distribution shift: per-row logit change vs fp32")
    ax.set_xlabel("logit(quantized) - logit(fp32)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    return _svg(fig)
