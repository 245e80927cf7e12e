"""Assembling a size / quality report: fp32 against each artifact on held-out rows.

`build_report` returns the report as a JSON-able dict (keys documented in docs/report.md) plus
its plots as SVG text; `embq.reports.render` writes report.json, report.md and report.html.
`compare_artifacts` is the same for two artifacts side by side.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from embq.models.metrics import click_metrics
from embq.progress import progress_bar
from embq.reports import plots
from embq.reports.bootstrap import paired_auc_delta, paired_logloss_delta
from embq.reports.measure import dense_layer_errors, lookup_counts, score, weighted_relative_mse

log = logging.getLogger("embq.reports")

REPORT_SCHEMA = "embq-report/1"
DEFAULT_UNIFORM = ("int8", "int4", "int4-opt", "int2-opt")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "rows"}


def _deltas(labels: np.ndarray, base: np.ndarray, probs: np.ndarray, fp32: dict[str, float],
            metrics: dict[str, float], resamples: int) -> dict[str, Any]:  # fmt: skip
    ll = paired_logloss_delta(labels, base, probs, resamples=resamples)
    auc = paired_auc_delta(labels, base, probs, resamples=max(100, resamples // 2))
    return {
        "logloss_delta_pct": ll.delta,
        "logloss_delta_ci95": ll.as_list(),
        "auc_delta": auc.delta,
        "auc_delta_ci95": auc.as_list(),
        "ne_delta_pct": 100.0 * (metrics["ne"] / fp32["ne"] - 1.0),
        "calibration_delta": metrics["calibration"] - fp32["calibration"],
        "bootstrap_resamples": resamples,
    }


def _table_entries(qmodel: Any, artifact: Any, fp32_tables: dict[str, Any], data: Any,
                   start: int, stop: int, sensitivity: dict | None) -> list[dict[str, Any]]:  # fmt: skip
    """Per table: shape, format, kernel, bytes, errors, lookup share and sensitivity."""
    meta = {t["name"]: t for t in (qmodel.metadata or {}).get("tables", [])}
    columns = {f: i for i, f in enumerate(data.sparse_feature_names)}
    ids = np.asarray(data.sparse[start:stop])
    total_lookups = ids.size
    entries = []
    for name, entry in artifact.tables.items():
        counts = np.zeros(entry.rows, np.int64)
        for feature in entry.feature_names:
            if feature in columns:
                counts += lookup_counts(ids[:, columns[feature]], entry.rows)
        fp32 = fp32_tables.get(name)
        weighted = (weighted_relative_mse(fp32.weight, artifact.table(name), counts)
                    if fp32 is not None else None)  # fmt: skip
        info = meta.get(name, {})
        entries.append({
            "name": name,
            "rows": entry.rows,
            "dim": entry.dim,
            "format": entry.format,
            "kernel": info.get("kernel"),
            "bytes": entry.bytes,
            "memory_bytes": info.get("memory_bytes", entry.bytes),
            "fp32_bytes": entry.rows * entry.dim * 4,
            "relative_mse": entry.stats.get("relative_mse"),
            "lookup_share": float(counts.sum() / total_lookups) if total_lookups else 0.0,
            "rows_touched_share": float((counts > 0).mean()),
            "weighted_relative_mse": weighted,
            "sensitivity": (sensitivity or {}).get(name),
        })  # fmt: skip
    return entries


def _dense_entry(artifact: Any, fp32_model: Any, qmodel: Any, data: Any, start: int,
                 stop: int) -> dict[str, Any] | None:  # fmt: skip
    """The dense towers: kind, method and bits per layer, and each layer's output error."""
    meta = artifact.dense_meta
    if meta is None:
        return None
    out: dict[str, Any] = {"kind": meta.get("kind"), "bytes": artifact.manifest["dense"]["bytes"]}
    info = meta.get("info") or {}
    out.update({k: info[k] for k in ("method", "w_bits", "a_bits", "tag") if k in info})
    layers = ((info.get("plan") or {}).get("layers")) or []
    batch = next(iter(data.batches(start, min(stop, start + 2048), batch_size=2048)))
    errors = dense_layer_errors(fp32_model, qmodel.module, batch)
    for i, e in enumerate(errors):
        plan = layers[i] if i < len(layers) else {}
        e.update({k: plan[k] for k in ("name", "w_bits", "a_bits") if k in plan})
        e.setdefault("method", out.get("method", "fp32" if out["kind"] == "fp32" else None))
    out["layers"] = errors
    return out


def score_artifact(path: str | os.PathLike, data: Any, start: int, stop: int,
                   kernel: str = "auto") -> tuple[Any, Any, np.ndarray]:  # fmt: skip
    """(QuantizedModel, Artifact, click probabilities [n]) of an artifact on rows start..stop."""
    from embq.api import load
    from embq.artifact.reader import load_artifact

    qmodel = load(path, kernel=kernel)
    artifact = load_artifact(path, verify=False)
    _, probs = score(qmodel, data, start, stop)
    return qmodel, artifact, probs


def build_report(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    artifacts: list[str | os.PathLike] = (),  # type: ignore[assignment]
    *,
    plans: list[str | os.PathLike] = (),  # type: ignore[assignment]
    sensitivity: dict[str, dict[str, float]] | None = None,
    uniform: list[dict[str, Any]] | None = None,
    uniform_formats: tuple[str, ...] = DEFAULT_UNIFORM,
    valid_fraction: float = 0.1,
    kernel: str = "auto",
    resamples: int = 1000,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Measure fp32 and each artifact on the held-out rows (the last `valid_fraction` of the
    prepared rows, the split `embq train` holds out).

    Args:
        model_dir: the fp32 model (`embq train` output).
        data_dir: its prepared dataset.
        artifacts: artifact directories to report on; `plans`: artifacts written from a plan
            (`embq plan` / `embq quantize --plan`), highlighted in the plots.
        sensitivity: {table: {format: predicted log-loss increase}} (a planner's sensitivity),
            shown per table when given.
        uniform: rows of `embq.reports.quality.quality_table` for the Pareto plot; computed for
            `uniform_formats` when None (an empty tuple skips them).
        kernel: the lookup kernels artifacts are loaded with (memory bytes depend on it).
        resamples: bootstrap resamples for the log-loss interval (AUC uses half).

    Returns:
        (report dict, {plot title: SVG text}).
    """
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import load_model
    from embq.models.tables import find_tables
    from embq.reports.quality import quality_table

    started = time.perf_counter()
    model, _ = load_model(model_dir)
    data = PreparedData(data_dir)
    _, (start, stop) = data.split(valid_fraction)
    log.info("scoring fp32 on %d held-out rows", stop - start)
    labels, base = score(model, data, start, stop)
    fp32 = click_metrics(labels, base)
    fp32_tables = {t.name: t for t in find_tables(model)}
    fp32_table_bytes = sum(t.rows * t.dim * 4 for t in fp32_tables.values())
    dense_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("sparse_arch"))
    fp32_entry = {**_rounded(fp32), "bytes_tables": fp32_table_bytes,
                  "bytes_dense": dense_params * 4, "bytes_total": fp32_table_bytes + dense_params * 4}  # fmt: skip

    entries, probs_by_name = [], {}
    paths = [(Path(p), "artifact") for p in artifacts] + [(Path(p), "plan") for p in plans]
    for path, kind in progress_bar(paths, enabled=progress, desc="artifacts", unit="artifact"):
        qmodel, artifact, probs = score_artifact(path, data, start, stop, kernel)
        metrics = click_metrics(labels, probs)
        tables = _table_entries(qmodel, artifact, fp32_tables, data, start, stop, sensitivity)
        dense = _dense_entry(artifact, model, qmodel, data, start, stop)
        bytes_tables = sum(t["bytes"] for t in tables)
        bytes_dense = dense["bytes"] if dense else 0
        name = path.name.removesuffix(".embq")
        probs_by_name[name] = probs
        entries.append({
            "name": name, "path": str(path), "kind": kind, "plan": str(qmodel.plan),
            "digest": getattr(qmodel, "digest", None),
            "bytes_tables": bytes_tables, "bytes_dense": bytes_dense,
            "bytes_total": _dir_bytes(path),
            "memory_bytes_tables": sum(t["memory_bytes"] for t in tables),
            "size_ratio": bytes_tables / fp32_table_bytes,
            "size_ratio_total": _dir_bytes(path) / fp32_entry["bytes_total"],
            "memory_ratio": sum(t["memory_bytes"] for t in tables) / fp32_table_bytes,
            **_rounded(metrics),
            **_deltas(labels, base, probs, fp32, metrics, resamples),
            "tables": tables, "dense": dense,
        })  # fmt: skip
    if uniform is None and uniform_formats:
        log.info("quantizing the tables in %d uniform formats", len(uniform_formats))
        uniform = quality_table(model_dir, data_dir, uniform_formats, valid_fraction=valid_fraction)
    report = {
        "schema": REPORT_SCHEMA,
        "dataset": data.name,
        "held_out_rows": stop - start,
        "held_out": [start, stop],
        "kernel": kernel,
        "fp32": fp32_entry,
        "artifacts": entries,
        "tables": entries[0]["tables"] if entries else [],
        "uniform": [r for r in (uniform or []) if r["format"] != "fp32"],
        "seconds": None,
    }
    figures = _figures(report, labels, base, probs_by_name)
    report["plots"] = list(figures)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report, figures


def _figures(report: dict[str, Any], labels: np.ndarray, base: np.ndarray,
             probs: dict[str, np.ndarray]) -> dict[str, str]:  # fmt: skip
    """{title: SVG} of the report's plots."""
    points = [{"name": r["format"], "size_ratio": r["size_ratio"],
               "logloss_delta_pct": r["logloss_delta_pct"], "kind": "uniform"}
              for r in report["uniform"]]  # fmt: skip
    points += [{"name": a["name"], "size_ratio": a["size_ratio"],
                "logloss_delta_pct": a["logloss_delta_pct"], "kind": a["kind"]}
               for a in report["artifacts"]]  # fmt: skip
    figures = {"Bytes vs log-loss change": plots.pareto_plot(points)}
    artifacts = report["artifacts"]
    if artifacts:
        first = artifacts[0]
        figures["Table bytes by format"] = plots.bytes_by_format_plot(artifacts)
        figures[f"Per-table bytes ({first['name']})"] = plots.table_bytes_plot(
            first["tables"], f"Per-table memory by format: {first['name']}")
        figures[f"Per-table error vs lookup share ({first['name']})"] = plots.error_vs_share_plot(
            first["tables"], f"Per-table error vs lookup share: {first['name']}")
        figures["Reliability"] = plots.reliability_plot(labels, {"fp32": base, **probs})
        figures["Score shift"] = plots.score_shift_plot(base, probs)
    return figures


def compare_artifacts(
    a: str | os.PathLike, b: str | os.PathLike, data_dir: str | os.PathLike, *,
    model_dir: str | os.PathLike | None = None, valid_fraction: float = 0.1,
    kernel: str = "auto", resamples: int = 1000,
) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """Two artifacts side by side on the same held-out rows: B's change over A (log loss, AUC,
    with paired bootstrap intervals), and per table which one is smaller and which closer to
    fp32 (errors on looked-up rows need the fp32 model: `model_dir`)."""
    from embq.data.prepared import PreparedData
    from embq.models.tables import find_tables

    data = PreparedData(data_dir)
    _, (start, stop) = data.split(valid_fraction)
    fp32_tables: dict[str, Any] = {}
    if model_dir is not None:
        from embq.models.dlrm import load_model

        fp32_tables = {t.name: t for t in find_tables(load_model(model_dir)[0])}
    sides = []
    labels = None
    for path in (Path(a), Path(b)):
        qmodel, artifact, probs = score_artifact(path, data, start, stop, kernel)
        if labels is None:
            labels = np.asarray(data.labels[start:stop], dtype=np.float64).reshape(-1)
        tables = _table_entries(qmodel, artifact, fp32_tables, data, start, stop, None)
        sides.append({"name": path.name.removesuffix(".embq"), "path": str(path),
                      "plan": str(qmodel.plan), "probs": probs, "tables": tables,
                      "bytes_tables": sum(t["bytes"] for t in tables),
                      "bytes_total": _dir_bytes(path), **_rounded(click_metrics(labels, probs))})  # fmt: skip
    ll = paired_logloss_delta(labels, sides[0]["probs"], sides[1]["probs"], resamples=resamples)
    auc = paired_auc_delta(labels, sides[0]["probs"], sides[1]["probs"],
                           resamples=max(100, resamples // 2))  # fmt: skip
    per_table = []
    tables_b = {t["name"]: t for t in sides[1]["tables"]}
    for ta in sides[0]["tables"]:
        tb = tables_b.get(ta["name"])
        if tb is None:
            continue
        ea, eb = ta["weighted_relative_mse"], tb["weighted_relative_mse"]
        per_table.append({
            "name": ta["name"], "format_a": ta["format"], "format_b": tb["format"],
            "bytes_a": ta["bytes"], "bytes_b": tb["bytes"],
            "error_a": ea if ea is not None else ta["relative_mse"],
            "error_b": eb if eb is not None else tb["relative_mse"],
            "smaller": "a" if ta["bytes"] < tb["bytes"] else "b" if tb["bytes"] < ta["bytes"] else "same",
        })  # fmt: skip
        errs = (per_table[-1]["error_a"], per_table[-1]["error_b"])
        per_table[-1]["closer_to_fp32"] = ("same" if errs[0] == errs[1] else
                                           "a" if errs[0] < errs[1] else "b")  # fmt: skip
    probs = {s["name"]: s.pop("probs") for s in sides}
    report = {
        "schema": REPORT_SCHEMA + "/compare",
        "dataset": data.name, "held_out_rows": stop - start,
        "a": sides[0], "b": sides[1],
        "b_vs_a": {"logloss_delta_pct": ll.delta, "logloss_delta_ci95": ll.as_list(),
                   "auc_delta": auc.delta, "auc_delta_ci95": auc.as_list(),
                   "bytes_ratio": sides[1]["bytes_tables"] / max(1, sides[0]["bytes_tables"])},
        "tables": per_table,
    }  # fmt: skip
    names = list(probs)
    figures = {"Reliability": plots.reliability_plot(labels, probs),
               "Score shift": plots.score_shift_plot(probs[names[0]], {names[1]: probs[names[1]]})}
    report["plots"] = list(figures)
    return report, figures

